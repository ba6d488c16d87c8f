"""routesvc: route each LLM request to the cheapest model that will answer it well."""
