"""Provider adapters: each translates its SDK's exceptions into routesvc errors."""

from routesvc.providers.base import Provider, ProviderCall

__all__ = ["Provider", "ProviderCall"]
