"""``BatchQueue``: batch jobs from Complete to the providers' batch APIs and back.

``submit`` stores a queued job and returns at once. A job whose submitter is cancelled before it
returns (a deadline, a client gone) never learned its id: it ends CANCELLED and is never sent.
A poller (``start`` / ``aclose``, owned by the server) groups queued jobs of one model into one
provider batch once the oldest has waited ``group_window_seconds`` (or ``max_group_size`` are
waiting), polls provider batches every ``poll_interval_seconds`` (a submit wakes it to group, not
to poll), and when one has ended reads its results: each job ends exactly once
(``BatchStore.finish``), and only a succeeded job is charged, at the batch price, in the ledger
(its end and its charge in one task a shutdown waits for: ``_settle``).

A result that reports no usage (a server whose batch results have no ``usage``, or leave a count
out) is charged an estimate of what it does not report, as a stream without usage is: the
input as the job's decision estimated it, as the model bills it (images at its
``image_token_scale``, as the submit's estimate counts them), the output counted in the answer;
flagged estimated in the ledger and logged (``batch_usage_estimated``, without prompt or answer).
A job queued before that estimate was kept with it (or whose model left the catalog before it
was queued) has no input charged then.

Outcomes: the provider's expiry ends a job EXPIRED, a failed request or batch FAILED (with a
short provider code), a cancelled one CANCELLED; none of them is charged, but for a job cancelled
after it was sent what the provider billed for it. A job still queued after
``max_queued_seconds`` (a spent quota, a provider down all that time) ends EXPIRED
``queued_too_long``. A provider batch refused whole for a reason that passes (OpenAI's enqueued
token limit, ``ProviderBatch.retry_later``) is no failure of its jobs: they go back to QUEUED
(``BatchStore.requeue``, their requests kept in the store until the provider accepts a batch of
them) and are sent again as one group after a wait as long as they have waited so far (at least
the poll interval, at most ``_MAX_RESEND_DELAY``); past ``max_queued_seconds`` they end FAILED
with the batch's code.

A job cancelled after it was sent may be answered, and billed, by the provider all the same: when
other jobs keep its provider batch running, or when the provider had answered it before the
cancel reached it (OpenAI writes those answers to the cancelled batch's output file; Anthropic
gives them ``succeeded`` results in the ended batch). Its provider batch is polled until it ends
and read like any other: such a job stays CANCELLED for its caller (no answer is returned), and
is charged once what the provider billed for it, in the ledger (outcome ``CANCELLED``, the
provider's usage, not estimated), in the metrics (``answered``), and in its tenant's budget, whose
estimate is held until then and corrected to that cost (to nothing when it was not answered).

Each model group and each provider batch is handled on its own: what goes wrong with one is logged
(never with prompt text) and the round goes on with the others. A retryable provider error (5xx,
429, timeout), a spent quota or a refused key (401/403) on sending leaves the group's jobs queued,
tried again next round. Any other error on sending fails that group's jobs (nothing was sent). On
polling or reading results, a rejection (400/404/409/413/422) fails the jobs of a batch sent with
this key (another key's: below):
``provider_batch_not_found`` for a 404 (the provider no longer knows a batch sent with its key),
else ``provider_batch_rejected``; a 401/403 is retried, as the batch still exists and the key may
be fixed. A 429 on a poll, or any answer with Retry-After, holds the polls of that provider (at
that base URL) for the Retry-After, else for delays doubling from the poll interval to
``_MAX_POLL_HOLD``, while other providers' polls go on (``batch_polls_held``). A provider batch
still running ``OVERDUE_AFTER_SECONDS`` after it was sent (stuck past its 24 h window, e.g. in
OpenAI's ``finalizing``) is cancelled and read as that ends it: its answers are delivered and
charged, its other jobs end EXPIRED ``batch_overdue`` (one the provider ended on its own, failed
or expired, keeps its outcome however late it is read); one that has not ended
``ABANDON_AFTER_SECONDS`` after it was sent ends its jobs so, uncharged, and is read no more; so
does one past that whose polls have failed or been held in a row for ``UNPOLLABLE_FOR_SECONDS``
(its status checks: one seen ended, as the store records for every process, is never given
up, its results read again each round).
A hot reload's provider settings (a rotated key) reach the adapters (``use_providers``),
which are otherwise those the queue started with. Models are looked up in the current catalog
(``catalog``, which follows hot reloads); a model no longer there fails its jobs not sent yet with
``model_not_in_catalog``; an answer the provider billed for a job already sent is delivered and
charged at the model as the catalog had it when the job was queued (kept with the job:
``BatchStore.model_spec``; a job stored before models were kept fails then, uncharged). Submitted
jobs of a provider that has no batch API here any more (its key removed at a restart) stay
SUBMITTED, logged once per provider batch (``batch_poll_skipped``), and are polled again once a
restart brings the key back.

Once every job of an ended provider batch has its end stored, what the provider keeps of the batch
(prompts and answers) is deleted there (``BatchAPI.discard``: OpenAI's input, output and error
files; the Anthropic message batch). Never before: a round whose store writes fail leaves the
batch to be read again. A delete that fails is logged (``batch_file_delete_failed``,
``batch_delete_failed``) and tried again by later rounds (``_discard_leftovers``, kept in memory:
a restart, or giving up after ``_DISCARD_TRIES``, leaves it to the provider, which expires what is
left: OpenAI's batch files after 30 days by default, Anthropic's results 29 days after the batch's
creation).

A provider batch no job waits for any more is cancelled at the provider: when its last waiting job
is cancelled, or when every job of a group was cancelled while the group was being sent. It is
still polled until it ends (OpenAI's ``cancelling`` lasts up to 10 minutes; Anthropic's
``canceling`` until the requests under way end), read for the answers it was billed for, and
then discarded as any other.

Several workers (``server.workers``) share one store, and each runs a poller: a group is sent
only by the worker that claimed its jobs (``BatchStore.claim``), so each job is submitted once.
A claim lasts ``CLAIM_SECONDS`` and a send is cut off at half of that, so it never outlives its
claim. A worker that dies or stops mid-send leaves its claim; once it lapses any worker (or the
restarted one) sends the jobs.

A send whose reply is lost (a connection reset after the provider handled it, a timeout, the
cut-off above, a worker gone mid-send) may have created the provider batch all the same. So each
send is tagged with an id of ours, stored with its jobs and its size before the request leaves
(``BatchStore.tag_send``), and the next send of those jobs first looks that batch up
(``BatchAPI.find``) and adopts it when the provider has it (``batch_send_adopted``), placing in it
every job of that send still queued, whatever group holds it now (a restart with a smaller
``max_group_size``), and tying to it the send's jobs cancelled since (read for their bill); it
sends nothing while the provider cannot be asked. A create answered with an HTTP status below 500
(a spent quota, a refused key) made nothing: its tag is forgotten and no lookup follows. OpenAI
keeps the tag in the batch's metadata and the input file's name (a file whose upload reply was lost
is deleted then). An Anthropic message batch keeps no tag, nor, before it ends, its requests'
custom_ids, and the list shows the whole workspace's: the lookup takes the one batch of as many
requests as the send held, created between the send's start and its cut-off, that no job of the
store from another send is in; with several such (another client sending as many requests at once)
it adopts none (``batch_send_ambiguous``) and sends again: that is the case a job can still reach
the provider twice. Jobs whose next send never comes (all cancelled or expired meanwhile) have
their send looked up by the poller all the same (``_look_up_unplaced``): the batch found is
cancelled, and read for their bill. A batch adopted by its shape (``BatchAPI.tags_batches`` false)
may be another client's until its results name its jobs: it is never cancelled
(``batch_cancel_skipped`` ``unverified``), its jobs' requests are kept, and when it ends with
results that name none of its jobs it is left alone, never deleted, and its jobs, never sent, are
queued again (``batch_adoption_undone``). Every worker polls every provider batch (of its
endpoints, below); a job ends once and is charged once, in the ledger of the worker that read its
result (a cancelled job's bill too: ``BatchStore.close_cancelled``).

Other processes may share the store with other providers behind the same provider name (a test
run against the fake provider beside a server on the real one, two deployments with their own
keys): a provider answers 404 for a batch it does not know, which would fail the jobs that
another provider is still running (and will bill). So each job records its endpoint, the
provider's base URL, where it is queued and where it is sent, and the fingerprint of the key it
was sent with (``key_id``), and a queue handles only its own:

- it sends only jobs queued for its own base URL of their provider and under its own key (the key
  of the process a job was submitted to, recorded as it is queued; another's stay queued, for
  their own process to send, so that one account's tenants' prompts never go to another account
  at the URL). Jobs queued under a key a reload rotated here, under a key whose batch this key
  reads (``BatchStore.adopt``: the same account's), or under a key no process has marked for
  ENDPOINT_GONE_AFTER_SECONDS (a restart with a rotated key; any process at the URL that sees it
  so first, whatever its account: the limit) are queued under this queue's key
  (``_follow_moved_endpoints``);
- it polls, reads and discards only provider batches sent to its own base URL, and cancels only
  those at the provider (another's are left alone, logged once each: ``batch_poll_skipped``
  ``other_endpoint``);
- a batch sent to its base URL with another key is polled all the same, as a rotated key of the
  same account (a hot reload, a restart) must go on with its jobs: when the provider knows it,
  the key now in use becomes its key (``BatchStore.adopt``); when it rejects the status check (a
  404, or any other 4xx rejection: a gateway may answer an id this key does not know with 400)
  the batch is another account's (another deployment at the same URL) and is left alone (``other_key``),
  never failed while a process sends with its key (each queue marks its keys as it marks its
  URLs: ``BatchStore.mark_keys``; the owner may be reading it for days, or cancelling it as
  overdue). Once it was sent ``OTHER_KEY_LOST_AFTER_SECONDS`` ago and its key's mark has stayed
  the same as a gone URL's does (below; a key no process of this release marked: its age alone),
  jobs still waiting are the rotated key's own, lost by the provider before the new key first
  polled it, and they end FAILED ``provider_batch_not_found`` as a lost batch's do, each only
  while the store holds that key's mark (``GoneMark``).

The base URL decides, not the key, so that a rotated key never strands a batch, at the cost of a
poll a round for each batch of another account at the same URL. A provider's base URL changed by
a hot reload (``use_providers``) keeps the old adapter: the batches sent to the old URL are still
polled, read, cancelled and deleted there with the key that sent them, and the jobs queued for it
and never sent are queued for the new one (``_follow_moved_endpoints``). A task of its own
(``_mark_served``) marks the base URLs the queue serves in the store every poll interval (at most
``_MAX_MARK_SECONDS`` apart: ``BatchStore.mark_endpoints``; once more as the store is opened,
``_mark_once``) and watches the other base URLs' last
marks (``_watch``); one that jobs are queued for or sent to whose mark stays the same over
``_GONE_MARKS`` of this queue's marks in a row spanning ``ENDPOINT_GONE_AFTER_SECONDS`` of its
monotonic time (a restart with a new base URL, or the other endpoint's process stopped that long)
is gone: its queued jobs are queued for this queue's base URL, and the jobs of its batches end
FAILED ``provider_changed`` (uncharged: what the old URL billed cannot be read from here), their
budgets' estimates given back, each only while the store still holds the mark it was taken as
gone by (``GoneMark``: a process back at the URL has marked it since). Marks are never compared
with this process's clock (a clock step, a suspended host, a marker polling hourly never make a
live process look gone), and a base URL no
process of this release has marked (an earlier release's, which writes no marks) is never gone:
its sent jobs wait for a process at that URL to read them.
A queued job whose last send's reply was lost at the old URL ends FAILED ``provider_changed``
rather than risk a second send elsewhere. Rows stored before endpoints were
recorded are anyone's, as before. Workers of ``server.workers`` (one config) share everything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from decimal import Decimal
from typing import Any, TypeVar

import structlog

from routesvc.batches._store import (
    Backoff,
    BatchStore,
    GoneMark,
    QueuedJob,
    QueuedRequest,
    SentBatch,
    SentJobs,
    UnplacedSend,
    decode_request,
    encode_model,
    encode_request,
    key_id,
    store_failure,
)
from routesvc.catalog import Catalog, ModelSpec
from routesvc.config import BATCH_API_KINDS, ProviderSettings, Settings
from routesvc.cost import billed_input_of_estimate, cost_of_usage, format_usd
from routesvc.errors import (
    BatchNotFound,
    BatchStoreUnavailable,
    ModelNotFound,
    ProviderAuthFailed,
    ProviderError,
    ProviderRejected,
    ProviderTimedOut,
    quoted_id,
)
from routesvc.ledger import AttemptOutcome, Ledger
from routesvc.models import (
    BatchJob,
    BatchResult,
    BatchState,
    BatchStatus,
    Mode,
    RouteDecision,
    RoutingRequest,
    Usage,
)
from routesvc.provider_text import valid_result
from routesvc.providers.batch import BatchAPI, BatchItem, ItemResult, ProviderBatch
from routesvc.reported_usage import believable_input, input_limit, output_limit, warn_implausible
from routesvc.retry import is_retryable, skips_provider
from routesvc.tasks import keep_until_done
from routesvc.tokens import count_text_tokens

log = structlog.get_logger("routesvc.batches")

_T = TypeVar("_T")
_K = TypeVar("_K", tuple[str, str], tuple[str, str, str])
# A provider batch's size: OpenAI takes an input file of up to 200 MB, Anthropic a batch of up to
# 256 MB. The jobs' stored requests (JSON, inline images in base64) are about what is sent; a
# group holds half the smaller limit at most, so that images cannot make a batch the provider
# refuses whole.
_MAX_GROUP_CHARS = 100_000_000
# Ended jobs deleted at most per poll round once past ``batch.retention_seconds``.
_PRUNE_PER_ROUND = 1000

ENDPOINT_GONE_AFTER_SECONDS = 3600.0
"""How long (of this process's monotonic time, in consecutive marks of its own) another process's
base URL that jobs are queued for or sent to must keep the same last mark (no process marking it:
its base URL was changed by a reload or a restart, or its process stopped) before the jobs are
moved off it: queued ones never sent to this process's base URL, sent ones ended FAILED
``provider_changed`` (their batch cannot be read from here). At least ``_GONE_MARKS`` times how
often its marker marks, and this process's own marks, too."""

_MAX_MARK_SECONDS = 60.0
"""Each queue marks its base URLs every ``poll_interval_seconds``, at most this long apart
(``_mark_served``), on a timer of its own: a long poll round (a hanging provider, a big backlog)
never delays a mark."""
_GONE_MARKS = 3
"""Another base URL is gone only after this many of this queue's own marks in a row, spanning
``ENDPOINT_GONE_AFTER_SECONDS`` and this many times its marker's and this queue's mark interval."""
_MARK_GAP_SLACK = 10.0
"""A gap between this queue's own marks longer than twice its interval and this (a stalled loop,
a paused VM, a store locked for long) starts every watch of other base URLs afresh: what happened
meanwhile was not seen."""

OVERDUE_AFTER_SECONDS = 2 * 86400.0
"""How long after it was sent a provider batch may run: the providers' 24 h window, then as long
again for a batch stuck past it (OpenAI's ``finalizing``). Past it a batch that has not ended is
cancelled at the provider, read once that ends it (what it answered is delivered and charged), and
its jobs without an answer end EXPIRED ``batch_overdue``."""

ABANDON_AFTER_SECONDS = OVERDUE_AFTER_SECONDS + 86400.0
"""How long after it was sent a provider batch that has not ended even after its cancel (stuck in
``cancelling``) is waited for: then its jobs end EXPIRED ``batch_overdue`` (those cancelled since
closed), uncharged, and it is read no more."""

UNPOLLABLE_FOR_SECONDS = 3600.0
"""How long (this process's monotonic time) the polls of a batch past ``ABANDON_AFTER_SECONDS``
must have failed, or been held, in a row before it is given up unread: a process back after days
away whose first poll meets a passing 5xx does not give up a batch the provider has ended."""

OTHER_KEY_LOST_AFTER_SECONDS = 2 * 86400.0
"""How long after it was sent a batch that another key sent to this URL, and this key does not
see (404), is left alone as another account's whatever happens: twice the providers' 24 h batch
window. Then its jobs, still waiting, are failed as lost once no process has marked its key for
ENDPOINT_GONE_AFTER_SECONDS (``BatchQueue._owner_gone``): a live owner may still be reading it."""

# A delete that left something at the provider is tried again this often at most, after delays
# doubling from the poll interval to an hour; this many leftovers are kept at most.
_DISCARD_TRIES = 8
_MAX_DISCARD_DELAY = 3600.0
_MAX_LEFTOVERS = 10_000
# Jobs of a provider batch refused for a while (OpenAI's enqueued token limit) wait as long as they
# have waited so far before they are sent again: at least the poll interval, at most this.
_MAX_RESEND_DELAY = 3600.0
# A provider that answers a poll 429 without Retry-After is polled again after delays doubling
# from the poll interval to this; a Retry-After is honoured as it says (``parse_retry_after`` caps it).
_MAX_POLL_HOLD = 600.0
_FAILURE_LOG_SECONDS = 600.0
"""How often, at most, a provider batch whose status checks or results reads keep failing the
same way is logged (``BatchQueue._log_failure``)."""
_CLOSE_SECONDS = 4.0
"""What ``aclose`` waits, in all, for the queue's writes and provider deletes still under way.
The Kubernetes grace period leaves 10 s after the drain and ``grace_seconds`` for this and the
telemetry flush (at most 4 s)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Leftover:
    """An ended provider batch some of which a delete left there: where it was, and when to try
    again (monotonic: a wall-clock step never puts it off)."""

    batch: ProviderBatch
    endpoint: str | None
    tries: int
    due: float


@dataclasses.dataclass(slots=True)
class _Failing:
    """A provider batch's failed status checks and results reads in a row: since when (monotonic),
    how many, and when each way they failed (event, reason) was last logged."""

    since: float
    count: int = 0
    logged: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class _Watched:
    """Another process's base URL as this queue's marks found it: its last mark (when, by its
    marker's clock; how often that marker marks), since when (this queue's monotonic time) it has
    been that mark, and over how many of this queue's marks in a row."""

    mark: tuple[float, float]
    since: float
    marks: int


def _watched_marks(
    before: Mapping[_K, _Watched], marks: Mapping[_K, tuple[float, float] | None], every: float, now: float
) -> tuple[dict[_K, _Watched], dict[_K, tuple[tuple[float, float], float]]]:
    """``marks`` as watched by this queue's mark at ``now`` (monotonic), after ``before``; and
    those whose last mark has stayed the same long enough to be gone (``BatchQueue._watch``),
    with that mark and for how long it has stayed."""
    watched: dict[_K, _Watched] = {}
    stale: dict[_K, tuple[tuple[float, float], float]] = {}
    for key, mark in marks.items():
        if mark is None:
            continue
        seen = before.get(key)
        if seen is None or seen.mark != mark:
            seen = _Watched(mark, now, 0)
        seen.marks += 1
        watched[key] = seen
        unmarked_for = max(ENDPOINT_GONE_AFTER_SECONDS, _GONE_MARKS * mark[1], _GONE_MARKS * every)
        if seen.marks >= _GONE_MARKS and now - seen.since >= unmarked_for:
            stale[key] = (mark, now - seen.since)
    return watched, stale


CLAIM_SECONDS = 300.0
"""How long a worker's claim on the jobs it is sending lasts (sends are cut off at half of it)."""

POLL_SECONDS = 60.0
"""How long one status check of a provider batch, or one cancel of it, may take, in all."""

RESULTS_SECONDS = 600.0
"""How long reading an ended provider batch's results may take, in all (its output file may be
up to 200 MB): a read cut off fails as any read does, and is tried again next round."""


async def _bounded(api: BatchAPI, call: Awaitable[_T], seconds: float, what: str) -> _T:
    """``call`` of ``api``, cut off after ``seconds`` in all (``ProviderTimedOut``): the SDK's
    timeout is per read, so an answer that trickled held the poller's round, every other batch's
    poll and every send with it, without end."""
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError as exc:
        message = f"{api.name}: batch {what} took over {seconds:.0f} s"
        raise ProviderTimedOut(message, provider=api.name, model="batch") from exc


def build_batch_apis(settings: Settings) -> dict[str, BatchAPI]:
    """A batch adapter per configured provider with credentials and a batch API."""
    apis: dict[str, BatchAPI] = {}
    for name, provider in settings.providers.items():
        api = _batch_api(provider)
        if api is not None:
            apis[name] = api
    return apis


# A provider batch's status once its cancel was asked for (OpenAI's spelling, then Anthropic's).
_CANCELLING = frozenset({"cancelling", "canceling"})
# A batch's status once a cancel has ended it (OpenAI's; an Anthropic batch ends "ended", its
# requests "canceled").
_CANCELLED = frozenset({"cancelled", "canceled"})


def _sends_to(provider: ProviderSettings) -> tuple[str, str]:
    """Where the provider's batch adapter sends: its base URL as the SDK resolves it (the
    configured one, else the SDK's default), and its key's fingerprint (``key_id``)."""
    from routesvc.providers.anthropic import DEFAULT_BASE_URL as ANTHROPIC_URL
    from routesvc.providers.openai import DEFAULT_BASE_URL as OPENAI_URL

    default = ANTHROPIC_URL if provider.kind == "anthropic" else OPENAI_URL
    return (provider.base_url or default).rstrip("/"), key_id(provider.api_key)


def _batch_api(provider: ProviderSettings) -> BatchAPI | None:
    """The provider's batch adapter; None without credentials or a batch API."""
    from routesvc.providers.anthropic_batch import AnthropicBatches
    from routesvc.providers.openai_batch import OpenAIBatches

    if not provider.configured or provider.kind not in BATCH_API_KINDS:
        return None
    if provider.kind == "anthropic":
        return AnthropicBatches(provider.name, provider.api_key, provider.base_url)
    if provider.kind == "openai":
        return OpenAIBatches(provider.name, provider.api_key, provider.base_url)
    return None


class BatchQueue:
    """Batch jobs: submit, look up, cancel; and the poller that moves them along.

    ``catalog`` gives the catalog in force now (the server passes its current router's, so models
    added or changed by a hot reload are found); default: the catalog of ``settings``.
    """

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        apis: Mapping[str, BatchAPI] | None = None,
        *,
        catalog: Callable[[], Catalog] | None = None,
        clock: Callable[[], float] = time.time,
        spend: Callable[[str, Decimal, float], None] | None = None,
        shared_budgets: bool = False,
        answered: Callable[[ModelSpec, str, Usage, Decimal, bool], None] | None = None,
    ) -> None:
        self._settings = settings
        # Told (model, provider model, usage, cost, whether its caller got it) of each answer
        # charged, for the metrics (also of a cancelled job the provider answered and billed).
        self._answered = answered
        # Told (tenant, USD, when the job was queued) once a job whose budget counted its
        # estimate (``commit``) has ended: its real cost less that estimate (all of it back when
        # it ended unanswered; a job cancelled after it was sent, once its provider batch is
        # read: what the provider billed for it, often nothing). Budgets kept per process
        # (``shared_budgets`` false) are corrected only by the queue that counted them, whichever
        # worker ended the job; a restarted process never counted its predecessor's jobs, so it
        # corrects none of them.
        self._spend = spend
        self._shared_budgets = shared_budgets
        self._catalog = catalog or (lambda: settings.catalog)
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._config = settings.config.batch
        self._ledger = ledger
        self._apis = dict(build_batch_apis(settings) if apis is None else apis)
        # What each adapter was built from (``use_providers`` rebuilds one when it changes);
        # adapters given as ``apis`` are never replaced.
        self._built_from = {} if apis is not None else {name: settings.providers[name] for name in self._apis}
        # Where each adapter sends (base URL, key fingerprint): whose jobs this queue handles.
        self._sends_to = {name: _sends_to(settings.providers[name]) for name in self._apis.keys() & settings.providers}
        # Adapters in use now (a send, a poll, a cancel), and replaced ones that are, to be
        # closed when their last use ends.
        self._uses: collections.Counter[BatchAPI] = collections.Counter()
        # Provider batches whose cancel this process asked for when it found no job waiting.
        self._cancel_asked: set[str] = set()
        # Provider batches under way whose jobs' requests were dropped here once the provider
        # accepted them (``drop_requests``), so that a round does not write that again.
        self._accepted: set[tuple[str, str]] = set()
        # What deletes left at the provider, by (provider, provider batch id), to try again.
        self._leftovers: dict[tuple[str, str], _Leftover] = {}
        self._replaced: set[BatchAPI] = set()
        # The adapters of base URLs a reload moved providers off, by (provider, base URL), with
        # where they send: the batches sent there are still polled, cancelled and deleted there.
        self._former: dict[tuple[str, str], tuple[BatchAPI, tuple[str, str]]] = {}
        # (provider, base URL) pairs with jobs whose last mark stayed the same over this queue's
        # marks for ENDPOINT_GONE_AFTER_SECONDS (``_mark_served``, ``_follow_moved_endpoints``),
        # with that mark (acted on only while the store still holds it: ``GoneMark``); the
        # others' marks as watched so far, and when (monotonic) this queue last marked.
        self._gone: dict[tuple[str, str], GoneMark] = {}
        self._watched: dict[tuple[str, str], _Watched] = {}
        # The same for the keys other accounts sent batches to this queue's base URLs with, by
        # (provider, base URL, key fingerprint): those no process sends with any more, and those
        # no process of this release ever marked (``_owner_gone``).
        self._owners_gone: dict[tuple[str, str, str], GoneMark] = {}
        self._watched_keys: dict[tuple[str, str, str], _Watched] = {}
        self._unmarked_keys: set[tuple[str, str, str]] = set()
        # The (provider, base URL, key fingerprint) this queue sent with before a reload rotated
        # the key: jobs still queued under it are queued under the key now in use, only while
        # the store holds this queue's last mark of it (no other process has marked it since:
        # one that sends with it sends its jobs).
        self._rotated_keys: set[tuple[str, str, str]] = set()
        # Batches another key sent to this queue's base URLs whose last status check here failed
        # otherwise than by a rejection (or was held): whether this key sees them cannot be told yet (a
        # rotated key of their account's, say), so their key is marked with this queue's, and
        # no process takes it as gone meanwhile (``_marked_for_others``); by (provider, provider batch
        # id), the (provider, base URL, key) they were sent with.
        self._undecided: dict[tuple[str, str], tuple[str, str, str]] = {}
        # Batches another key sent to this queue's base URLs that got 404 (or another rejection)
        # from this queue's key, by (provider, provider batch id): that key (this key does not see them, so its checks'
        # failures tell nothing of their owner and never mark their key again: ``_not_told``).
        self._not_seen: dict[tuple[str, str], str] = {}
        # Batches found ended whose key is gone, left unread here (404), by (provider, provider
        # batch id): when (monotonic) that was last logged (``_warn_unread``).
        self._unread: dict[tuple[str, str], float] = {}
        self._last_mark: float | None = None
        self._marker: asyncio.Task[None] | None = None
        # Providers (by name and base URL) whose polls wait after a 429 or a Retry-After: until
        # when (monotonic: a wall-clock step never lengthens a hold), and how many such answers in
        # a row.
        self._polls_held: dict[tuple[str, str], tuple[float, int]] = {}
        # Provider batches whose polls fail or are held, by (provider, provider batch id): since
        # when (monotonic) in a row (``_given_up``).
        self._failing_since: dict[tuple[str, str], float] = {}
        # Provider batches this round's status check found ended (what fails after it is their
        # results read): never given up, read again each round. Recorded in the store
        # (``mark_ended``), for later rounds, a restarted process and the others sharing it
        # (``SentJobs.ended``).
        self._seen_ended: set[tuple[str, str]] = set()
        # Provider batches whose polls or results reads fail in a row: how they were logged
        # (``_log_failure``).
        self._failures: dict[tuple[str, str], _Failing] = {}
        self._clock = clock
        self._path = settings.batch_store_path
        self._store: BatchStore | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Store writes a cancelled caller left behind (see ``submit``); ``aclose`` waits for them.
        self._pending: set[asyncio.Task[Any]] = set()
        # Reads of budget corrections, whose callbacks tell them (``_tell_corrections``).
        self._reading: set[asyncio.Future[Any]] = set()
        self._closed = False
        # Provider batches already logged as not polled here (no batch API, another endpoint's,
        # another account's): logged once each. Like ``_accepted`` and ``_cancel_asked``, kept
        # only while the batch is still to be read (``_poll``: read by any process since, forgotten).
        self._unpollable: set[tuple[str, str]] = set()

    @property
    def enabled(self) -> bool:
        """``batch.enabled`` as the queue was started with (a change needs a restart)."""
        return self._config.enabled

    def supports(self, provider: str) -> bool:
        """Whether ``provider`` has a batch API here."""
        return self._config.enabled and provider in self._apis

    def use_providers(self, providers: Mapping[str, ProviderSettings]) -> None:
        """Send, poll and cancel with ``providers``' credentials from now on (a hot reload, e.g.
        a rotated key): each provider with a batch adapter here whose settings changed, and that
        still has a key and a batch API, gets a new adapter; the old one is closed once nothing
        uses it. Which providers have a batch API here stays as the queue started (a provider
        whose key is gone keeps its old adapter: batch settings need a restart)."""
        for name, api in list(self._apis.items()):
            provider, built_from = providers.get(name), self._built_from.get(name)
            if provider is None or built_from is None or provider == built_from:
                continue
            fresh = _batch_api(provider)
            if fresh is None:
                continue
            old_sent_to, new_sent_to = self._sends_to[name], _sends_to(provider)
            self._apis[name] = fresh
            self._built_from[name] = provider
            self._sends_to[name] = new_sent_to
            # Back to a base URL it was moved off: that adapter is not needed any more.
            self._retire(self._former.pop((name, new_sent_to[0]), (None, None))[0])
            # Back to a key it rotated away from: its jobs are this queue's to send again.
            self._rotated_keys.discard((name, *new_sent_to))
            if old_sent_to[0] != new_sent_to[0]:
                # Moved to another base URL: the batches sent to the old one are still read
                # there, with the adapter that sent them (closed with the queue).
                self._retire(self._former.pop((name, old_sent_to[0]), (None, None))[0])
                self._former[(name, old_sent_to[0])] = (api, old_sent_to)
                log.info("batch_provider_moved", provider=name)
            else:
                self._retire(api)
            if old_sent_to[1] != new_sent_to[1]:
                # A rotated key: the jobs queued under the old one are this queue's own
                # (``_follow_moved_endpoints`` queues them under the new one) while no other
                # process marks it (a key this one used by mistake, then reverted, is that one's).
                self._rotated_keys.add((name, *old_sent_to))
            log.info("batch_provider_updated", provider=name)

    def _retire(self, api: BatchAPI | None) -> None:
        """Close ``api`` once nothing uses it."""
        if api is None:
            return
        if self._uses[api]:
            self._replaced.add(api)
        else:
            self._keep(api.aclose())

    def _reaching(self, provider: str, endpoint: str | None) -> tuple[BatchAPI, tuple[str, str]] | None:
        """The adapter that reaches ``provider``'s batches at ``endpoint``, and where it sends: the
        current one for this queue's base URL (or an unrecorded endpoint), the one a reload
        moved off ``endpoint`` for that; None when this queue cannot reach it."""
        if endpoint is not None and endpoint != self._endpoint(provider):
            return self._former.get((provider, endpoint))
        api = self._apis.get(provider)
        return None if api is None else (api, self._sends_to[provider])

    @contextlib.contextmanager
    def _using(self, provider: str, endpoint: str | None = None) -> Iterator[BatchAPI | None]:
        """The provider's adapter (None: no batch API here), kept open while the block runs; with
        ``endpoint``, the one that reaches that base URL (``_reaching``)."""
        reached = self._reaching(provider, endpoint)
        api = None if reached is None else reached[0]
        if api is None:
            yield None
            return
        self._uses[api] += 1
        try:
            yield api
        finally:
            self._uses[api] -= 1
            if not self._uses[api]:
                del self._uses[api]
                if api in self._replaced:
                    self._replaced.discard(api)
                    self._keep(api.aclose())

    def _max_tenant_request_bytes(self) -> int | None:
        """The bytes of requests one tenant's queued jobs may keep in the store; None: no cap of its own."""
        share = self._config.max_tenant_share_of_stored_requests
        return None if share >= 1 else int(self._config.max_stored_request_bytes * share)

    def _opened(self) -> BatchStore:
        # Opened on first use (or at start when the file exists), so a server that never sees a
        # batch request never creates the file.
        if self._closed:
            raise BatchStoreUnavailable("the batch queue is closed (the server is stopping)")
        if self._store is None:
            try:
                self._store = BatchStore(
                    self._path,
                    clock=self._clock,
                    max_request_bytes=self._config.max_stored_request_bytes,
                    max_tenant_request_bytes=self._max_tenant_request_bytes(),
                )
            except (OSError, sqlite3.Error) as exc:
                log.error("batch_store_unavailable", path=str(self._path), error_type=type(exc).__name__)
                raise store_failure(self._path, exc, "cannot be opened") from exc
            # Marked at once, not at the marker's next tick: a process stopped before that tick
            # would leave its URL never marked, so its sent jobs were never taken as gone.
            self._keep(self._mark_once())
        return self._store

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the poller; jobs already in the store (a restart) are picked up, and so are
        those of a store another process creates later (the poller opens it once it exists)."""
        if self._path.exists():
            self._opened()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-poller")
        self._marker = asyncio.get_running_loop().create_task(self._mark_served(), name="batch-marker")

    async def aclose(self) -> None:
        """Stop the poller, close the store and the adapters' connections. Nothing opens the store
        again: a late withdraw or commit is logged, and its job's hold lapses as after a crash."""
        for task in (self._task, self._marker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._marker = None
        waiting_for = "the queue's writes and provider deletes"
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                if self._pending:
                    await asyncio.gather(*self._pending, return_exceptions=True)
                self._closed = True
                waiting_for = "the store"
                if self._store is not None:
                    await self._store.aclose()
                    self._store = None
                waiting_for = "the provider clients' deletes"
                for api in [*self._apis.values(), *(api for api, _ in self._former.values()), *self._replaced]:
                    await api.aclose()
        except TimeoutError:
            # A provider delete (a file of prompts, a batch's answers) or a store write still
            # running: what it would have done is left to the provider's expiry or, for a job
            # whose hold it would have released, to the hold's lapse, as after a crash.
            log.warning("batch_close_cut_short", seconds=_CLOSE_SECONDS, waiting_for=waiting_for)
            for task in list(self._pending):
                task.cancel()
        finally:
            self._closed = True
            self._replaced.clear()

    # -- the RPCs --------------------------------------------------------------------------------

    async def submit(self, request: RoutingRequest, decision: RouteDecision) -> BatchJob:
        """Store a queued job for ``decision``, held: no poller sends it until the caller
        ``commit``s it (once the job's id is on its way to its client) or ``withdraw``s it.

        A cancelled caller (deadline, client gone) cannot stop the write, which runs in a worker
        thread: it is let finish and the job ended CANCELLED (``caller_cancelled``), so it is
        never sent or charged, and a retry makes no duplicate. A job neither committed nor
        withdrawn (its process died) is sent once its hold lapses (``CLAIM_SECONDS``).
        """
        now = self._clock()
        job = BatchJob(
            batch_id=f"batch_{uuid.uuid4().hex}",
            tenant=request.context.tenant,
            state=BatchState.QUEUED,
            model=decision.model,
            provider=decision.provider,
            estimated_cost_usd=decision.estimated_cost_usd,
            created_at=now,
            updated_at=now,
            decision_id=decision.decision_id,
            estimated_input_tokens=self._billed_input(decision),
        )
        chat = request.chat
        stored = QueuedRequest(
            chat.messages,
            decision.estimated_output_tokens,
            chat.temperature,
            chat.tools,
            stop=chat.stop,
            tool_choice=chat.tool_choice,
            parallel_tool_calls=chat.parallel_tool_calls,
            response_format=chat.response_format,
        )
        store = self._opened()
        sent_to = self._sends_to.get(job.provider)
        try:
            # Kept with the job: an answer billed after a reload removed the model is charged at these.
            model_spec: str | None = encode_model(self._catalog().get(decision.model))
        except ModelNotFound:
            model_spec = None
        adding = self._keep(
            store.add(
                job,
                encode_request(stored),
                held_by=self._owner,
                hold_seconds=CLAIM_SECONDS,
                endpoint=None if sent_to is None else sent_to[0],
                key=None if sent_to is None else sent_to[1],
                model_spec=model_spec,
            )
        )
        try:
            await asyncio.shield(adding)
        except BaseException:
            # Cancelled, or the store failed: the caller gets no id, so the job must not run.
            await asyncio.shield(self._keep(self._withdraw(adding, job.batch_id)))
            raise
        log.info("batch_job_queued", batch_id=job.batch_id, model=job.model, tenant=job.tenant)
        return job

    def _endpoint(self, provider: str) -> str | None:
        """The base URL this queue sends ``provider``'s batches to; None without a batch API for it."""
        sent_to = self._sends_to.get(provider)
        return None if sent_to is None else sent_to[0]

    def _to_send(self, job: QueuedJob) -> bool:
        """Whether a queued job is this queue's to send: queued for its base URL of the job's
        provider and under its key (another account's process at the URL sends the others), or
        stored before either was recorded."""
        own_key = self._sends_to.get(job.provider, (None, None))[1]
        return self._ours(job.provider, job.endpoint) and (job.key_id is None or job.key_id == own_key)

    def _ours(self, provider: str, endpoint: str | None) -> bool:
        """Whether a job or batch of ``provider`` recorded for ``endpoint`` is this queue's to
        handle: one for its base URL of that provider, or one stored before endpoints were."""
        return endpoint is None or endpoint == self._endpoint(provider)

    def _reachable(self, provider: str, endpoint: str | None) -> bool:
        """Whether a provider batch recorded as sent to ``endpoint`` can be polled, cancelled and
        deleted here: at this queue's base URL, or one a reload moved this queue off."""
        return self._ours(provider, endpoint) or (endpoint is not None and (provider, endpoint) in self._former)

    def _skip_once(self, provider: str, provider_batch_id: str, jobs: SentJobs, reason: str) -> None:
        """Log, once per provider batch, that it is left alone here (``reason``)."""
        if (provider, provider_batch_id) in self._unpollable:
            return
        self._unpollable.add((provider, provider_batch_id))
        emit = log.warning if reason == "no_batch_api" else log.info
        emit(
            "batch_poll_skipped",
            provider=provider,
            provider_batch_id=provider_batch_id,
            jobs=len(jobs.waiting) + len(jobs.cancelled),
            reason=reason,
        )

    def _keep(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run ``work`` as a task that outlives its caller's cancellation (``aclose`` waits for it)."""
        task = asyncio.get_running_loop().create_task(work)
        keep_until_done(task, self._pending)
        return task

    async def _withdraw(self, adding: asyncio.Task[None], batch_id: str) -> None:
        """Once the write ``adding`` is done, end its job CANCELLED (its submitter gave up)."""
        try:
            await adding
        except Exception:
            return  # never stored: nothing to withdraw
        await self._withdraw_stored(batch_id)

    async def _withdraw_stored(self, batch_id: str) -> None:
        try:
            await self._opened().finish(batch_id, BatchState.CANCELLED, error="caller_cancelled")
        except BatchStoreUnavailable as error:
            # Left as it is: it is sent (a held one once its hold lapses, CLAIM_SECONDS), as
            # after a crash.
            log.error("batch_withdraw_failed", batch_id=batch_id, error=error.message)
            return
        log.info("batch_job_withdrawn", batch_id=batch_id)

    async def withdraw(self, batch_id: str, *, then: Callable[[], Awaitable[object]]) -> None:
        """End a held job whose id never reached its caller (the call ended first): CANCELLED
        ``caller_cancelled``, never sent; then ``then`` (the caller's settle at nothing). Both run
        to their end in one task, whatever happens to the caller meanwhile."""

        async def withdrawing() -> None:
            await self._withdraw_stored(batch_id)
            await then()

        await asyncio.shield(self._keep(withdrawing()))

    async def commit(self, batch_id: str, count: Callable[[], Awaitable[Decimal | None]]) -> None:
        """Let a held job be sent: its id is on its way to its caller, so it stands however the
        call ends. ``count`` (the caller's settle) runs first and says what the tenant's budget
        counted for the job (None: nothing), recorded with the release so that the job's end
        corrects it once. Both run to their end in one task; a store failure is logged (the job is
        then sent when its hold lapses, its budget left as counted)."""

        async def committing() -> None:
            try:
                usd = await count()
            except Exception:
                # Our bug in the settle: the job is still released (its id is out), uncounted.
                log.exception("batch_commit_count_failed", batch_id=batch_id)
                usd = None
            try:
                await self._opened().commit(batch_id, self._owner, usd)
            except BatchStoreUnavailable as error:
                log.error("batch_commit_failed", batch_id=batch_id, error=error.message)
                return
            self._wake.set()

        await asyncio.shield(self._keep(committing()))

    async def _correct_budgets(self) -> None:
        """Tell ``spend`` the corrections of counted jobs that have ended, each once: read, mark
        and tell in one task that outlives a cancelled caller (a correction marked is a
        correction told)."""
        if self._spend is not None and self._store is not None:
            await asyncio.shield(self._keep(self._tell_corrections(self._store, self._spend)))

    async def _tell_corrections(self, store: BatchStore, spend: Callable[[str, Decimal, float], None]) -> None:
        # The store marks the corrections it returns as made, in a worker thread that runs to its
        # end whatever happens to this task: they are told as that read ends, in its callback, so
        # that a cancellation of this task (``aclose`` cut short) cannot drop corrections marked.
        reading = asyncio.ensure_future(store.budget_corrections(self._owner, any_owner=self._shared_budgets))
        self._reading.add(reading)

        def tell(done: asyncio.Future[list[tuple[str, Decimal, float]]]) -> None:
            self._reading.discard(reading)
            if done.cancelled() or done.exception() is not None:
                return  # nothing marked (the awaiting caller gets the error)
            for tenant, usd, queued_at in done.result():
                if usd:
                    spend(tenant, usd, queued_at)

        reading.add_done_callback(tell)
        await asyncio.shield(reading)

    async def get(self, batch_id: str, tenant: str) -> BatchStatus:
        """The job ``batch_id`` of ``tenant``; ``BatchNotFound`` for an unknown or another tenant's job."""
        status = None if self._store is None and not self._path.exists() else await self._opened().get(batch_id, tenant)
        if status is None:
            raise BatchNotFound(f"no batch job {quoted_id(batch_id)}")
        return status

    async def cancel(self, batch_id: str, tenant: str) -> BatchStatus:
        """Cancel a job that has not ended; an ended job is returned as it is.

        A job not sent yet is never sent or charged. A job already in a provider batch is
        cancelled there when no other job of that batch is still waiting for its answer; the
        provider may have answered it (and billed it) all the same, so it is charged what the
        provider billed once that batch has ended (see the module's docstring), and its
        tenant's budget keeps its estimate until then.
        """
        status = await self.get(batch_id, tenant)
        if status.job.state.ended:
            return status
        emptied = await self._opened().cancel(batch_id)
        if emptied is not None:
            await self._cancel_sent_batch(emptied)
        try:
            await self._correct_budgets()  # at once, rather than at the next round
        except BatchStoreUnavailable as error:
            log.warning("batch_budget_correction_failed", batch_id=batch_id, error=error.message)
        log.info("batch_job_cancelled", batch_id=batch_id)
        return await self.get(batch_id, tenant)

    async def _cancel_sent_batch(self, batch: SentBatch) -> None:
        """Cancel a provider batch no job waits for, when it was sent to this queue's endpoint;
        another endpoint's is cancelled by its own process when it next polls it (``_poll_batch``)
        and read by it once it ends."""
        if not self._reachable(batch.provider, batch.endpoint):
            log.info("batch_cancel_skipped", provider_batch_id=batch.provider_batch_id, reason="other_endpoint")
            return
        if batch.unverified:
            # Adopted by its shape, it may be another client's: never cancelled (it runs, and
            # is read, as it is; its results tell).
            log.info("batch_cancel_skipped", provider_batch_id=batch.provider_batch_id, reason="unverified")
            return
        with self._using(batch.provider, batch.endpoint) as api:
            if api is None:
                log.warning("batch_cancel_failed", provider_batch_id=batch.provider_batch_id, reason="no_batch_api")
                return
            await self._cancel_with(api, batch.provider_batch_id)

    @staticmethod
    async def _cancel_with(api: BatchAPI, provider_batch_id: str) -> None:
        """Cancel ``provider_batch_id`` through ``api``; a failure is logged (the batch runs on)."""
        try:
            await _bounded(api, api.cancel(provider_batch_id), POLL_SECONDS, "cancel")
        except ProviderError as error:
            log.warning("batch_cancel_failed", provider_batch_id=provider_batch_id, reason=error.reason)
            return
        log.info("batch_provider_batch_cancelled", provider_batch_id=provider_batch_id)

    # -- the poller ------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.poll_interval_seconds
        next_poll = loop.time()
        while True:
            # Cleared as the round starts, not after it: a job submitted while the round runs
            # wakes the next one, instead of waiting for the next poll.
            self._wake.clear()
            next_flush = None
            if self._store is None and self._path.exists():
                # Created since this queue started (a sibling replica's first batch request): its
                # jobs are this queue's to poll, and its URLs to mark, as if it had been there.
                with contextlib.suppress(BatchStoreUnavailable):  # logged; tried again next round
                    self._opened()
            if self._store is not None:
                try:
                    await self._expire_queued()
                    next_flush = await self._flush()
                except Exception:
                    # The store failing (each group handles its own errors): log it and try again
                    # next round, never stop polling.
                    log.exception("batch_round_crashed")
                # A wake (a submit) only groups; provider batches are polled once an interval.
                if loop.time() >= next_poll:
                    next_poll = loop.time() + interval
                    try:
                        await self._follow_moved_endpoints()
                        await self._poll()
                        await self._look_up_unplaced()
                        await self._discard_leftovers()
                        await self._prune_ended()
                    except Exception:
                        log.exception("batch_round_crashed")
                try:
                    await self._correct_budgets()  # jobs ended in this round, or by another worker
                except Exception:
                    log.exception("batch_round_crashed")
            wait = max(0.0, next_poll - loop.time()) if self._store is not None else interval
            if next_flush is not None:
                wait = min(wait, next_flush)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _prune_ended(self) -> None:
        """Delete jobs ended more than ``retention_seconds`` ago, a bounded number a round (a
        backlog drains over a few rounds, and no round holds the store for long)."""
        ended_before = self._clock() - self._config.retention_seconds
        pruned = await self._opened().prune_ended(ended_before, _PRUNE_PER_ROUND)
        if pruned:
            log.info("batch_jobs_pruned", jobs=pruned)

    async def _expire_queued(self) -> None:
        """End EXPIRED ``queued_too_long`` the jobs that have waited, queued, ``max_queued_seconds``
        (never sent: uncharged, and their budget is given back as for any job ended unanswered)."""
        queued_before = self._clock() - self._config.max_queued_seconds
        expired = await self._opened().expire_queued(queued_before, "queued_too_long")
        if expired:
            log.warning("batch_jobs_expired", jobs=expired, reason="queued_too_long")

    async def _flush(self) -> float | None:
        """Send due groups of queued jobs; seconds until the next group is due (None: none waiting).

        Of all the jobs only ids and request sizes are read; a group's requests (prompts, inline
        images) are read once it is claimed, one group at a time, however many jobs wait."""
        groups: dict[str, list[QueuedJob]] = {}
        for job in await self._opened().queued():
            if self._to_send(job):  # another endpoint's (or account's) process sends the others
                groups.setdefault(job.model, []).append(job)
        now = self._clock()
        next_due: float | None = None
        for model_id, jobs in groups.items():
            due_in = jobs[0].created_at + self._config.group_window_seconds - now
            if due_in > 0 and len(jobs) < self._config.max_group_size:
                next_due = due_in if next_due is None else min(next_due, due_in)
                continue
            for group in _groups(jobs, self._config.max_group_size, _MAX_GROUP_CHARS):
                try:
                    await self._send(model_id, [job.batch_id for job in group])
                except Exception:
                    # Our bug or the store: the other groups go on. The claim is kept until it
                    # lapses, so a group that keeps crashing is retried every CLAIM_SECONDS.
                    log.exception("batch_send_crashed", model=model_id, jobs=len(group))
        return next_due

    async def _send(self, model_id: str, batch_ids: list[str]) -> None:
        """Claim the jobs of ``batch_ids`` and send the ones claimed as one provider batch."""
        store = self._opened()
        claimed = await store.claim(batch_ids, self._owner, CLAIM_SECONDS)
        if not claimed:
            return  # another worker is sending them
        model = await self._model(model_id, claimed)
        if model is None:
            return
        with self._using(model.provider) as api:
            if api is None:
                # The provider lost its key or batch API since the job was queued (a restart with new config).
                await self._fail(claimed, "no_batch_api")
                log.warning("batch_provider_missing", model=model_id, provider=model.provider, jobs=len(claimed))
                return
            # Where this adapter sends, read with it: a reload while the batch is sent changes
            # both for later sends, not for this one (recorded as sent to the new endpoint, it
            # was polled there, found missing and failed while the old endpoint ran and billed it).
            sent_to = self._sends_to[model.provider]  # set with every adapter
            requests = await store.requests(claimed, self._owner)
            ids = [batch_id for batch_id in claimed if batch_id in requests]  # less any cancelled since
            ids = await self._adopt_earlier(api, model, ids, sent_to)
            if not ids:
                return
            items = [_item(batch_id, model, decode_request(requests.pop(batch_id))) for batch_id in ids]
            tag = uuid.uuid4().hex
            # Stored before the create leaves: if its reply is lost (a reset, a timeout, a crash)
            # the batch may exist all the same, and whoever sends these jobs next adopts it.
            ids = await store.tag_send(ids, self._owner, tag)
            items = [item for item in items if item.custom_id in ids]
            if not ids:
                return
            try:
                provider_batch_id = await self._submit(api, items, tag)
            except ProviderError as error:
                # Not the jobs' fault: a spent quota, or a key refused (401/403: one being rotated,
                # which a reload brings). They wait, queued, until the account is paid or the key
                # fixed (or they have waited max_queued_seconds: ``_expire_queued``), as after a
                # failure that may pass.
                if is_retryable(error) or skips_provider(error) or isinstance(error, ProviderAuthFailed):
                    # Answered with a status below 500 (a spent quota, a key refused), the create
                    # made nothing: its tag is forgotten, so no lookup follows. Only a reply lost
                    # (no status: a reset, a timeout) or a 5xx leaves it.
                    refused = error.status is not None and error.status < 500
                    await store.release(ids, self._owner, refused=refused)
                    log.warning("batch_submit_failed", model=model_id, jobs=len(ids), reason=error.reason)
                    return
                await self._fail(ids, error.reason)
                if error.status is not None and error.status < 500:
                    # Refused with an answer, the create made nothing: no lookup of it follows.
                    await store.forget_send(tag)
                log.warning("batch_submit_rejected", model=model_id, jobs=len(ids), reason=error.reason)
                return
            placed = await store.mark_submitted(ids, self._owner, model.provider, provider_batch_id, sent_to)
            log.info("batch_submitted", model=model_id, jobs=placed, provider_batch_id=provider_batch_id)
            if placed == 0:
                # Every job was cancelled while it was being sent: the provider would run (and bill)
                # the whole batch. It is read once it ends, for what it answered before the cancel.
                # Cancelled where it was sent.
                await self._cancel_with(api, provider_batch_id)

    async def _adopt_earlier(
        self, api: BatchAPI, model: ModelSpec, ids: list[str], sent_to: tuple[str, str]
    ) -> list[str]:
        """Of the claimed jobs ``ids``, those to send: a job whose earlier send may have reached
        the provider (its reply lost) is placed in the batch that send created, when the
        provider has it (``BatchAPI.find``); none is sent when the provider cannot be asked (the
        jobs are released, to be looked up again next round). A job moved to this key by its
        send's lookup (``_rekey_lost_sends``) whose send this lookup finds none of, or several,
        ends FAILED ``provider_changed``: the batch that lookup found is gone since (its owner,
        another client, read and deleted it) or adopted by another send of its shape, and this
        key may be another account's, which must not send it again (the send's own batch, under
        the old key, may have answered it)."""
        store = self._opened()
        to_send = list(ids)
        for tag, send in (await store.sends(ids)).items():
            tagged = send.jobs
            try:
                found = await self._find_send(api, model.provider, tag, send.count, send.since)
            except (ProviderError, TimeoutError) as error:
                await store.release(ids, self._owner)
                reason = error.reason if isinstance(error, ProviderError) else "timeout"
                log.warning("batch_submit_failed", model=model.id, jobs=len(ids), reason=reason)
                return []
            if len(found) != 1:
                if found:
                    # Anthropic keeps no tag: as many batches of as many requests since then.
                    log.warning("batch_send_ambiguous", model=model.id, jobs=len(tagged), candidates=len(found))
                if send.moved:
                    failed = await self._fail(send.moved, "provider_changed")
                    if failed:
                        why = "key_changed"
                        log.warning("batch_jobs_moved", provider=model.provider, jobs=0, failed_jobs=failed, reason=why)
                    to_send = [batch_id for batch_id in to_send if batch_id not in send.moved]
                continue
            unverified = not api.tags_batches
            placed = await store.mark_submitted(
                tagged, self._owner, model.provider, found[0], sent_to, tag=tag, unverified=unverified
            )
            log.info(
                "batch_send_adopted", model=model.id, jobs=placed, provider_batch_id=found[0], verified=not unverified
            )
            if placed == 0 and unverified:
                # It may be another client's: never cancelled (``_cancel_sent_batch``).
                log.info("batch_cancel_skipped", provider_batch_id=found[0], reason="unverified")
            elif placed == 0 and not await store.knows(model.provider, found[0]):
                # No job of the send waits for it (a sibling group's would): cancelled.
                await self._cancel_with(api, found[0])
            to_send = [batch_id for batch_id in to_send if batch_id not in tagged]
        return to_send

    async def _find_send(self, api: BatchAPI, provider: str, tag: str, count: int, since: float) -> list[str]:
        """The batches the send tagged ``tag`` (of ``count`` requests, begun at ``since``) may
        have created, as ``api``'s key sees them (``BatchAPI.find``), less those jobs of other
        sends were placed in; raises ``ProviderError`` or ``TimeoutError`` when it cannot tell."""
        async with asyncio.timeout(CLAIM_SECONDS / 2):
            # The send was cut off at half of CLAIM_SECONDS; the rest is room for the provider
            # to have stamped a create it received by then.
            found = await api.find(tag, count, since, since + CLAIM_SECONDS)
        # A batch some sibling group of this send already adopted (a restart cutting the send's
        # jobs into other groups) is still this send's: its jobs go in it too.
        store = self._opened()
        return [batch for batch in found if not await store.knows(provider, batch, other_than=tag)]

    async def _look_up_unplaced(self) -> None:
        """Look up the batch of each send whose reply was lost and whose jobs all ended before
        their next send (cancelled, expired ``queued_too_long``): no send looks it up any more,
        and the provider would run and bill it unread. Found, its jobs are tied to it as jobs
        cancelled after they were sent (read once it ends, charged what the provider billed),
        and it is cancelled there (unless adopted by its shape: ``_cancel_sent_batch``); not
        found (or not told from another client's), the tag is forgotten. A provider that cannot
        be asked leaves it to the next round."""
        for send in await self._opened().unplaced_sends():
            reached = self._reaching(send.provider, send.endpoint)
            if reached is None:
                gone = None if send.endpoint is None else self._gone.get((send.provider, send.endpoint))
                # Its base URL is served by no process any more (unless one came back since the
                # watch: its mark then changed): the batch cannot be looked up.
                if gone is not None and await self._opened().forget_send(send.tag, gone=gone):
                    log.warning("batch_lookup_abandoned", provider=send.provider, reason="provider_changed")
                continue  # else another endpoint's process looks it up
            owner_gone = None
            if send.key_id is not None and send.key_id != reached[1][1]:
                owner = (send.provider, reached[1][0], send.key_id)
                owner_gone = self._owners_gone.get(owner)
                if owner_gone is None and owner in self._rotated_keys:
                    # A key this process rotated away from: its forget only while the store holds
                    # this process's last mark of it (a key once used by mistake, then reverted,
                    # marked since by its live deployment, has its lost sends left to that one).
                    owner_gone = self._own_mark(owner)
                if owner_gone is None:
                    # Another key's, whose process may be live (an unplaced send's key is watched
                    # as a batch's is): another account's key would find nothing and forget it,
                    # and its batch ran billed, never cancelled nor read. Looked up with this key
                    # only once that key is taken as gone, or if this process rotated away from it.
                    continue
            with self._using(send.provider, send.endpoint) as api:
                if api is None:
                    continue
                await self._look_up_one(api, send, reached[1], owner_gone)

    async def _look_up_one(
        self, api: BatchAPI, send: UnplacedSend, sent_to: tuple[str, str], gone: GoneMark | None = None
    ) -> None:
        store = self._opened()
        try:
            found = await self._find_send(api, send.provider, send.tag, send.count, send.since)
        except (ProviderError, TimeoutError) as error:
            reason = error.reason if isinstance(error, ProviderError) else "timeout"
            log.warning("batch_lookup_failed", provider=send.provider, reason=reason)
            return
        if len(found) != 1:
            # Another key's, taken as gone: only while the store holds that mark.
            await store.forget_send(send.tag, gone=gone)
            if found:
                log.warning("batch_send_ambiguous", provider=send.provider, candidates=len(found))
            return
        unverified = not api.tags_batches
        tied = await store.tie_unplaced(send.tag, send.provider, found[0], sent_to, unverified=unverified)
        if not tied:
            # Its jobs failed after the send whose reply was lost (a reload or restart took their
            # model away before it was looked up): nothing to tie, but the batch runs, billed.
            # Cancelled (when surely ours), so it bills no more; what it billed is not charged.
            await store.forget_send(send.tag)
            log.warning("batch_send_untied", provider=send.provider, provider_batch_id=found[0])
            await self._cancel_sent_batch(SentBatch(send.provider, found[0], sent_to[0], unverified))
            return
        log.info("batch_send_adopted", provider=send.provider, jobs=0, cancelled_jobs=tied, provider_batch_id=found[0])
        await self._cancel_sent_batch(SentBatch(send.provider, found[0], sent_to[0], unverified))

    async def _submit(self, api: BatchAPI, items: list[BatchItem], tag: str) -> str:
        """``api.submit``, cut off well before the claim on its jobs lapses."""
        seconds = CLAIM_SECONDS / 2
        try:
            async with asyncio.timeout(seconds):
                return await api.submit(items, tag)
        except TimeoutError as exc:
            message = f"{api.name}: batch submit took over {seconds:.0f} s"
            raise ProviderTimedOut(message, provider=api.name, model="batch") from exc

    def _billed_input(self, decision: RouteDecision) -> int | None:
        """The input tokens the decided model bills for the job's request as its decision
        estimated them (images at the model's ``image_token_scale``, as the budget's reservation
        counted them): charged if its result reports none. None when the model has left the
        catalog since the decision (a reload), whose jobs fail ``model_not_in_catalog`` unless
        it comes back (before they are sent)."""
        try:
            return billed_input_of_estimate(self._catalog().get(decision.model), decision)
        except ModelNotFound:
            return None

    async def _model(self, model_id: str, batch_ids: list[str]) -> ModelSpec | None:
        """The model from the current catalog; None (and the jobs FAILED) when it is not there."""
        try:
            return self._catalog().get(model_id)
        except ModelNotFound:
            await self._fail(batch_ids, "model_not_in_catalog")
            log.warning("batch_model_unknown", model=model_id, jobs=len(batch_ids))
            return None

    async def _fail(self, batch_ids: list[str], error: str, *, gone: GoneMark | None = None) -> int:
        """End FAILED the jobs of ``batch_ids`` that had not ended (with ``gone``: while the store
        still holds that mark of their base URL); how many did."""
        failed = 0
        for batch_id in batch_ids:
            failed += await self._opened().finish(batch_id, BatchState.FAILED, error=error, gone=gone)
        return failed

    async def _poll(self) -> None:
        """Poll each provider batch not yet read; read the results of those that have ended."""
        submitted = await self._opened().submitted()
        # Batches read since (here or by another worker) are no longer watched.
        self._failing_since = {key: since for key, since in self._failing_since.items() if key in submitted}
        self._seen_ended &= submitted.keys()
        self._failures = {key: failing for key, failing in self._failures.items() if key in submitted}
        self._undecided = {key: owner for key, owner in self._undecided.items() if key in submitted}
        self._not_seen = {key: own for key, own in self._not_seen.items() if key in submitted}
        self._unread = {key: logged for key, logged in self._unread.items() if key in submitted}
        self._unpollable &= submitted.keys()
        self._accepted &= submitted.keys()
        self._cancel_asked &= {provider_batch_id for _, provider_batch_id in submitted}
        for (provider, provider_batch_id), jobs in submitted.items():
            if provider not in self._apis:
                # Its key was removed at a restart: the jobs wait, SUBMITTED, for a restart with it.
                self._skip_once(provider, provider_batch_id, jobs, "no_batch_api")
                continue
            reached = self._reaching(provider, jobs.endpoint)
            if reached is None:
                gone = None if jobs.endpoint is None else self._gone.get((provider, jobs.endpoint))
                if gone is not None:
                    # Sent to a base URL no process serves any more (this provider's before a
                    # reload or a restart moved it): it cannot be read from here.
                    await self._lose(provider_batch_id, jobs, "provider_changed", None, gone)
                else:
                    # Sent to another endpoint by another process, which reads it: a poll here
                    # would get a 404 and fail jobs that are running there.
                    self._skip_once(provider, provider_batch_id, jobs, "other_endpoint")
                continue
            held = self._polls_held.get((provider, reached[1][0]))
            if held is not None and held[0] > time.monotonic():
                # It asked us to wait (a 429, a Retry-After): its other batches wait too, but one
                # past ABANDON_AFTER_SECONDS is given up all the same (a hold that never lifts).
                self._not_told(provider, provider_batch_id, jobs, reached[1])
                if self._given_up(provider, provider_batch_id, jobs):
                    await self._abandon(provider, provider_batch_id, jobs, status=None, reason="polls_held")
                continue
            with self._using(provider, jobs.endpoint) as api:
                if api is not None:
                    await self._poll_one(api, provider, provider_batch_id, jobs, reached[1])

    async def _follow_moved_endpoints(self) -> None:
        """Move jobs off the base URLs taken as gone (``_watch``) and off those a reload moved
        this queue off: queued jobs never sent are queued for this
        queue's base URL of their provider (and its key); one whose last send's reply was lost there ends FAILED
        ``provider_changed`` (its batch, if it made one, is looked up and cancelled there by
        ``_look_up_unplaced`` while this process can reach it). Batches sent to a gone base URL
        are ended by ``_poll``. The same for keys at this queue's base URLs: jobs queued under a
        key a reload rotated here, or under one no process has marked for
        ENDPOINT_GONE_AFTER_SECONDS (``_owners_gone``: a process restarted with a rotated key,
        or stopped), are queued under this queue's key; of the latter, one whose last send's reply
        was lost only if this key finds that send's batch (``_rekey_lost_sends``)."""
        store = self._opened()
        moved_off: list[tuple[tuple[str, str], GoneMark | None]] = [(pair, None) for pair in self._former]
        for (provider, endpoint), gone in [*moved_off, *self._gone.items()]:
            sent_to = self._sends_to.get(provider)
            if sent_to is None or sent_to[0] == endpoint:
                continue
            # A gone URL's jobs only while the store holds the mark it was taken as gone by.
            await self._moved(provider, await store.move_queued(provider, endpoint, sent_to, gone=gone), gone)
        rotated = [(triple, self._own_mark(triple), True) for triple in self._rotated_keys]
        for (provider, endpoint, old_key), gone, ours in [
            *rotated,
            *((triple, gone, False) for triple, gone in self._owners_gone.items()),
        ]:
            sent_to = self._sends_to.get(provider)
            if sent_to is None or sent_to[0] != endpoint or sent_to[1] == old_key:
                continue
            # Only while the store holds the mark the key was rotated away or taken as gone by.
            moved = await store.rekey_queued(provider, endpoint, old_key, sent_to[1], gone=gone, rotated=ours)
            if moved[1]:
                moved = await self._rekey_lost_sends(provider, endpoint, old_key, sent_to[1], moved, gone)
            await self._moved(provider, moved, gone, reason="key_changed")

    async def _rekey_lost_sends(
        self, provider: str, endpoint: str, old_key: str, key: str, moved: tuple[int, list[str]], gone: GoneMark
    ) -> tuple[int, list[str]]:
        """Of the jobs ``rekey_queued`` left under ``old_key`` (a key taken as gone), whose last
        send's reply was lost: a send whose batch ``key`` finds (the same account's key, a
        restart with a rotated key) has its jobs queued under ``key``, their send then adopting
        that batch (``_adopt_earlier``); those of a send it finds none of (another account's key,
        which neither lists nor reads the old key's batches), or several, are returned with how
        many moved, to end FAILED (``_moved``); those of a send it cannot ask about now wait,
        queued under ``old_key``, for the next round. Where batches carry no tag
        (``BatchAPI.tags_batches`` false: Anthropic, found by shape) the batch found may be
        another client's of another account (any batch of as many requests made in the send's
        window in ``key``'s workspace passes for the send's): the jobs moved are marked so
        (``rekey_queued`` ``tag``), and if their adoption is undone (``_disown``: its results
        name none of them), or their send's own lookup finds that batch no more, or several
        (``_adopt_earlier``), they end FAILED ``provider_changed``, never sent again with ``key``."""
        store = self._opened()
        count, to_fail = moved
        with self._using(provider, endpoint) as api:
            if api is None:
                return count, []
            for tag, send in (await store.sends(moved[1])).items():
                tagged = send.jobs
                try:
                    found = await self._find_send(api, provider, tag, send.count, send.since)
                except (ProviderError, TimeoutError) as error:
                    reason = error.reason if isinstance(error, ProviderError) else "timeout"
                    log.warning("batch_lookup_failed", provider=provider, reason=reason)
                    to_fail = [batch_id for batch_id in to_fail if batch_id not in tagged]
                    continue
                if len(found) == 1:
                    count += (await store.rekey_queued(provider, endpoint, old_key, key, gone=gone, tag=tag))[0]
                    to_fail = [batch_id for batch_id in to_fail if batch_id not in tagged]
        return count, to_fail

    def _own_mark(self, triple: tuple[str, str, str]) -> GoneMark:
        """The last mark this queue wrote of the key ``triple`` (none: while no process has)."""
        seen_at, every = self._opened().own_key_mark(triple) or (None, 0.0)
        return GoneMark(*triple[:2], seen_at, every, key_id=triple[2])

    async def _moved(
        self, provider: str, moved: tuple[int, list[str]], gone: GoneMark | None, *, reason: str | None = None
    ) -> None:
        """After ``move_queued`` or ``rekey_queued`` (how many moved, the ids left): those left,
        whose last send's reply was lost under the old base URL or key (and, under a key taken as
        gone, whose batch this key did not find: ``_rekey_lost_sends``), end FAILED
        ``provider_changed`` rather than be sent twice (with ``gone``, while the store holds
        it)."""
        failed = await self._fail(moved[1], "provider_changed", gone=gone)
        if moved[0] or failed:
            why = {} if reason is None else {"reason": reason}
            log.warning("batch_jobs_moved", provider=provider, jobs=moved[0], failed_jobs=failed, **why)
            self._wake.set()

    def _served(self) -> list[tuple[str, str]]:
        """The (provider, base URL) pairs this queue marks as served: its own, and those a reload
        moved it off, still polled here."""
        return [*((name, sent_to[0]) for name, sent_to in self._sends_to.items()), *self._former]

    def _served_keys(self) -> list[tuple[str, str, str]]:
        """The (provider, base URL, key fingerprint) triples this queue sends or polls with."""
        served = {
            *((name, *sent_to) for name, sent_to in self._sends_to.items()),
            *((name, *sent_to) for (name, _), (_, sent_to) in self._former.items()),
        }
        return sorted(served)

    def _marked_for_others(self) -> list[tuple[str, str, str]]:
        """The keys of other keys' batches whose status checks here cannot tell yet whether this
        key sees them (``_undecided``), marked with this queue's own: a rotated key's batches keep
        their key marked while their owner's checks fail, until it reads them (``adopt``) or gets
        404. Marked on their owner's behalf, such a mark is this queue's own (``_own_mark``) only
        while no other process has marked the key since this queue's last own mark of it: a key
        this process once sent with by mistake, then reverted, marked here during a provider
        hiccup, made the store's last mark of it this queue's, and the jobs of the live
        deployment that sends with it were queued under this queue's key and sent with it."""
        return sorted(set(self._undecided.values()))

    def _not_told(
        self,
        provider: str,
        provider_batch_id: str,
        jobs: SentJobs,
        sent_to: tuple[str, str],
        error: ProviderError | None = None,
    ) -> None:
        """Note that this round's status check of a batch could not tell whether this key sees
        it (it failed otherwise than by a rejection, or was held): when another key sent it here, that key
        is marked with this queue's until a check tells (``_undecided``). Bounded: never once
        this key got 404 for it (``_not_seen``: it does not see it, so its failures say nothing
        of the owner; a failure now and then between 404s kept the key marked for ever), and
        never past ``ABANDON_AFTER_SECONDS`` after it was sent (an owner's checks failing that
        long give it up themselves), so a lost batch is failed at most that and
        ENDPOINT_GONE_AFTER_SECONDS after it was sent. A batch found ended is marked for as
        well (bounded the same): its cancelled jobs are closed unread once its key is unmarked
        (``_close_unreadable``), and its owner's rotated key in an outage (5xx, timeouts, 429
        holds) still reads them and charges their bill. For a batch found ended, never when this
        key is refused (``error`` a 401/403, ``ProviderAuthFailed``): a process whose own key was
        refused silenced ``batch_unread_owner_gone`` for every batch found ended at its URL. For
        one not ended a refusal marks too: it may be the owner's own rotated key refused for a
        while (a 403 for a region or a missing permission), and unmarked, another account failed
        its live batch, unread and unbilled."""
        batch = (provider, provider_batch_id)
        own_key = sent_to[1]
        if (
            jobs.key_id is None
            or jobs.endpoint is None
            or own_key in (None, jobs.key_id)
            or (isinstance(error, ProviderAuthFailed) and self._found_ended(batch, jobs))
            or self._not_seen.get(batch) == own_key
            or jobs.sent_at is None
            or self._clock() - jobs.sent_at > ABANDON_AFTER_SECONDS
        ):
            self._undecided.pop(batch, None)
            return
        self._undecided[batch] = (provider, jobs.endpoint, jobs.key_id)

    async def _mark_once(self) -> None:
        """Mark this queue's base URLs and keys as the store is first opened (the marker's ticks watch)."""
        try:
            every = min(self._config.poll_interval_seconds, _MAX_MARK_SECONDS)
            await self._opened().mark_endpoints(self._served(), every)
            await self._opened().mark_keys(self._served_keys(), every, for_others=self._marked_for_others())
        except Exception:
            log.exception("batch_mark_failed")

    async def _mark_served(self) -> None:
        """Every poll interval (at most ``_MAX_MARK_SECONDS``), on a timer of its own, mark this
        queue's base URLs (and those a reload moved it off, still polled here) as served, and
        watch the last marks of the other base URLs jobs wait at (``_watch``)."""
        loop = asyncio.get_running_loop()
        every = min(self._config.poll_interval_seconds, _MAX_MARK_SECONDS)
        while True:
            if self._store is not None:
                try:
                    marks = await self._store.mark_endpoints(self._served(), every)
                    key_marks = await self._store.mark_keys(
                        self._served_keys(), every, for_others=self._marked_for_others()
                    )
                    self._watch(marks, key_marks, every, loop.time())
                except Exception:
                    # The store failing: nothing is taken as gone until the watch starts again.
                    log.exception("batch_mark_failed")
                    self._gone, self._watched, self._last_mark = {}, {}, None
                    self._owners_gone, self._watched_keys = {}, {}
            await asyncio.sleep(every)

    def _watch(
        self,
        marks: Mapping[tuple[str, str], tuple[float, float] | None],
        key_marks: Mapping[tuple[str, str, str], tuple[float, float] | None],
        every: float,
        now: float,
    ) -> None:
        """Take as gone each other base URL (``marks``) and each other key sent with at this
        queue's base URLs (``key_marks``) whose last mark has stayed the same over ``_GONE_MARKS``
        of this queue's marks in a row, spanning ENDPOINT_GONE_AFTER_SECONDS of this queue's
        monotonic time (``now``) and ``_GONE_MARKS`` times its marker's interval and this
        queue's (``every``). Marks are compared only with themselves, never with this process's
        clock: a clock step, a host suspended (monotonic time stops with it) or a marker's long
        interval never makes a live process look gone. A URL never marked by a process that
        marks (an earlier release's) is never gone; a gap in this queue's own marks starts the
        watch afresh."""
        if self._last_mark is None or now - self._last_mark > 2 * every + _MARK_GAP_SLACK:
            self._watched, self._watched_keys = {}, {}
        self._last_mark = now
        self._watched, stale = _watched_marks(self._watched, marks, every, now)
        gone = {pair: GoneMark(*pair, *mark) for pair, (mark, _) in stale.items()}
        for pair, (_, unmarked) in stale.items():
            if pair not in self._gone:
                log.warning("batch_endpoint_gone", provider=pair[0], unmarked_seconds=round(unmarked, 1))
        self._gone = gone
        self._watched_keys, stale_keys = _watched_marks(self._watched_keys, key_marks, every, now)
        self._owners_gone = {
            (provider, endpoint, key): GoneMark(provider, endpoint, *mark, key_id=key)
            for (provider, endpoint, key), (mark, _) in stale_keys.items()
        }
        self._unmarked_keys = {triple for triple, mark in key_marks.items() if mark is None}

    async def _lose(
        self,
        provider_batch_id: str,
        jobs: SentJobs,
        code: str,
        status: int | None,
        gone: GoneMark | None = None,
    ) -> None:
        """End the jobs of a provider batch that can no longer be read: those waiting FAILED
        ``code``, those cancelled since closed uncharged (its bill cannot be read); their
        budgets' estimates are given back as for any job ended unanswered. With ``gone`` (its
        base URL no process serves any more), each only while the store still holds the mark
        ``gone`` was taken by (a process back at the URL marked it anew: its jobs are its own to
        read). None failed or closed: another worker ended them since this round listed them."""
        failed = await self._fail(list(jobs.waiting), code, gone=gone)
        closed = 0
        for batch_id in jobs.cancelled:
            closed += await self._opened().close_cancelled(batch_id, None, gone=gone)
        if failed or closed:
            log.warning(
                "batch_lost",
                provider_batch_id=provider_batch_id,
                jobs=failed,
                cancelled_jobs=closed,
                status=status,
                error=code,
            )

    async def _poll_one(
        self, api: BatchAPI, provider: str, provider_batch_id: str, jobs: SentJobs, sent_to: tuple[str, str]
    ) -> None:
        """Poll one provider batch with ``api`` (which sends to ``sent_to``); what goes wrong with
        it is logged (or fails its jobs)."""
        self._seen_ended.discard((provider, provider_batch_id))
        try:
            await self._poll_batch(api, provider, provider_batch_id, jobs, sent_to)
            self._polls_held.pop((provider, sent_to[0]), None)
            self._failing_since.pop((provider, provider_batch_id), None)
            self._failures.pop((provider, provider_batch_id), None)
        except ProviderRejected as error:
            self._accepted.discard((provider, provider_batch_id))
            if error.status == 404 and jobs.unverified:
                # Adopted by its shape and gone before we read it (a 404 to its own key: another
                # key's is left to ``_poll_batch``): another client's, deleted by its owner once
                # read (we never delete one unread); its jobs were never sent.
                await self._disown(provider, provider_batch_id, jobs, answered=True)
                return
            code = "provider_batch_not_found" if error.status == 404 else "provider_batch_rejected"
            # Another worker may have stored the results and deleted the batch (or its files)
            # since this round listed its jobs: then none is failed or closed.
            await self._lose(provider_batch_id, jobs, code, error.status)
        except ProviderError as error:
            # This round's status check found it ended: its results read failed. A batch found
            # ended, now or before (the store), is read again next round, never given up,
            # whatever fails (a status check too: its key revoked since, say).
            read_failed = (provider, provider_batch_id) in self._seen_ended
            ended = jobs.ended or read_failed
            event = "batch_results_read_failed" if read_failed else "batch_poll_failed"
            self._log_failure(event, provider, provider_batch_id, error, ended=ended)
            if not read_failed:
                self._not_told(provider, provider_batch_id, jobs, sent_to, error)
            held = error.status == 429 or error.retry_after is not None
            if held:
                self._hold_polls(provider, sent_to[0], error)
            if not ended and self._given_up(provider, provider_batch_id, jobs):
                # Its polls kept failing (a revoked key, a provider down for days): given up as a
                # batch that never ends is, its cancel asked first unless the provider asked us to
                # wait (it may run on and bill; nothing of it is read any more).
                if not held and not jobs.unverified:
                    await self._cancel_with(api, provider_batch_id)
                await self._abandon(provider, provider_batch_id, jobs, status=None, reason=error.reason)
        except Exception:
            # Our bug or the store: the other batches go on; this one is polled again next round.
            log.exception("batch_poll_crashed", provider_batch_id=provider_batch_id)

    async def _end_overdue(
        self, api: BatchAPI, provider: str, batch: ProviderBatch, jobs: SentJobs, *, abandon: bool
    ) -> None:
        """A provider batch still running ``OVERDUE_AFTER_SECONDS`` after it was sent (stuck past
        its window): cancelled at the provider, once per process (unless adopted by its shape: it
        may be another client's), to be read as it ends; past ``ABANDON_AFTER_SECONDS`` its jobs
        end EXPIRED ``batch_overdue`` here, uncharged (those cancelled since closed), and it is
        read no more."""
        if not jobs.unverified and batch.status not in _CANCELLING and batch.id not in self._cancel_asked:
            self._cancel_asked.add(batch.id)
            log.warning("batch_overdue", provider=provider, provider_batch_id=batch.id, status=batch.status)
            await self._cancel_with(api, batch.id)
        if abandon:
            await self._abandon(provider, batch.id, jobs, status=batch.status)

    def _log_failure(
        self, event: str, provider: str, provider_batch_id: str, error: ProviderError, *, ended: bool
    ) -> None:
        """Log a failed status check or results read of a provider batch: each way it fails
        (event, reason) the first time it does in a row of failures, and then at most every
        ``_FAILURE_LOG_SECONDS`` (with how many failed in all, over how long), however they
        alternate (a flapping provider: a status check failing every other round, a results read
        the rounds between): a batch found ended is never given up, so its failures could last
        days, a round each."""
        now = time.monotonic()
        failing = self._failures.setdefault((provider, provider_batch_id), _Failing(now))
        failing.count += 1
        logged_at = failing.logged.get((event, error.reason))
        if logged_at is not None and now - logged_at < _FAILURE_LOG_SECONDS:
            return
        failing.logged[(event, error.reason)] = now
        log.warning(
            event,
            provider_batch_id=provider_batch_id,
            reason=error.reason,
            ended=ended,
            failures=failing.count,
            failing_seconds=round(now - failing.since, 1),
        )

    def _found_ended(self, batch: tuple[str, str], jobs: SentJobs) -> bool:
        """Whether a status check found ``batch`` ended: as the store records (any process's,
        a restart's predecessor too), or this process since (its results read failing)."""
        return jobs.ended or batch in self._seen_ended

    def _given_up(self, provider: str, provider_batch_id: str, jobs: SentJobs) -> bool:
        """Note that a poll of this batch failed (or was held), and tell whether it is to be given
        up: sent more than ``ABANDON_AFTER_SECONDS`` ago, and its polls failing or held in a row
        for ``UNPOLLABLE_FOR_SECONDS`` here. Never one a status check found ended (this round, or
        as the store records, any process's before, a restart's predecessor too; its results read
        failing): it is billed, and read once the provider lets it."""
        if self._found_ended((provider, provider_batch_id), jobs):
            return False
        now = time.monotonic()
        since = self._failing_since.setdefault((provider, provider_batch_id), now)
        past = jobs.sent_at is not None and self._clock() - jobs.sent_at > ABANDON_AFTER_SECONDS
        return past and now - since >= UNPOLLABLE_FOR_SECONDS

    async def _abandon(
        self, provider: str, provider_batch_id: str, jobs: SentJobs, *, status: str | None, reason: str | None = None
    ) -> None:
        """End the jobs of a provider batch given up ``ABANDON_AFTER_SECONDS`` after it was sent
        (not ended even after its cancel, or never polled since: its polls failing or held):
        those waiting EXPIRED ``batch_overdue``, those cancelled since closed, uncharged; it is
        read no more. ``status``: the batch's as last polled; ``reason``: why the poll failed."""
        expired = 0
        for batch_id in jobs.waiting:
            expired += await self._opened().finish(batch_id, BatchState.EXPIRED, error="batch_overdue")
        closed = 0
        for batch_id in jobs.cancelled:
            closed += await self._opened().close_cancelled(batch_id, None)
        self._cancel_asked.discard(provider_batch_id)
        self._accepted.discard((provider, provider_batch_id))
        self._failing_since.pop((provider, provider_batch_id), None)
        log.warning(
            "batch_abandoned",
            provider=provider,
            provider_batch_id=provider_batch_id,
            status=status,
            reason=reason,
            jobs=expired,
            cancelled_jobs=closed,
        )

    def _hold_polls(self, provider: str, endpoint: str, error: ProviderError) -> None:
        """Poll nothing more of ``provider`` at ``endpoint`` for as long as ``error`` (a 429, or an
        answer with Retry-After) asks, or, without Retry-After, for delays doubling from the poll
        interval to ``_MAX_POLL_HOLD``; other providers' polls go on."""
        _, times = self._polls_held.get((provider, endpoint), (0.0, 0))
        seconds = error.retry_after
        if seconds is None:
            seconds = min(_MAX_POLL_HOLD, self._config.poll_interval_seconds * 2**times)
        self._polls_held[(provider, endpoint)] = (time.monotonic() + seconds, times + 1)
        log.warning("batch_polls_held", provider=provider, seconds=seconds, reason=error.reason)

    async def _status(self, api: BatchAPI, provider_batch_id: str) -> ProviderBatch:
        """``api.poll``, cut off after ``POLL_SECONDS``."""
        return await _bounded(api, api.poll(provider_batch_id), POLL_SECONDS, "status check")

    async def _poll_batch(
        self, api: BatchAPI, provider: str, provider_batch_id: str, jobs: SentJobs, sent_to: tuple[str, str]
    ) -> None:
        own_key: str | None = sent_to[1]
        other_key = jobs.key_id is not None and own_key is not None and jobs.key_id != own_key
        try:
            batch = await self._status(api, provider_batch_id)
        except ProviderRejected as error:
            self._undecided.pop((provider, provider_batch_id), None)
            if not other_key:
                raise
            # Any rejection (a 404, or a 400/409/422 a gateway answers for an id this key does
            # not know): this key does not see it. So for a batch adopted by its shape too
            # (unverified): only its own key's 404 tells it is gone (``_poll_one`` then undoes
            # the adoption); another account's key sees none of its batches.
            if own_key is not None:
                self._not_seen[(provider, provider_batch_id)] = own_key
            adopted_gone = self._adopted_key_gone(provider, jobs) if jobs.unverified and error.status == 404 else None
            if adopted_gone is not None:
                # Its own key gone (unmarked for ENDPOINT_GONE_AFTER_SECONDS, or rotated away from
                # here), no 404 to it can come: this key's undoes the adoption, while the store
                # holds the key's mark. Left alone, its jobs waited two days and ended FAILED
                # ``provider_batch_not_found``. Unmarked that long, the key is taken as this key's
                # predecessor, the same account's, and its jobs, never sent, are queued again. A
                # key this process's reload rotated away from is no proof of that (as for
                # ``_rekey_lost_sends``): this key may be another account's, blind to the batch,
                # which may be the jobs' own, running: they end FAILED ``provider_changed``.
                gone, resend = adopted_gone
                if await self._disown(provider, provider_batch_id, jobs, answered=True, gone=gone, resend=resend):
                    self._accepted.discard((provider, provider_batch_id))
                    return
                # The store holds another mark of that key since (a process sends with it
                # again): not gone, so another account's batch as below.
            owner_gone = self._owner_gone(provider, jobs)
            if owner_gone is None:
                # Sent to this URL with another key, and this one does not see it: another
                # account's (another deployment), which reads it; not lost.
                self._skip_once(provider, provider_batch_id, jobs, "other_key")
                key_gone = self._key_gone(provider, jobs) if jobs.ended else None
                if key_gone is not None:
                    await self._close_unreadable(provider_batch_id, jobs, key_gone)
                    if jobs.waiting:
                        self._warn_unread(provider, provider_batch_id, jobs)
                return
            # No process sends with its key any more: a rotated key's own batch, lost by the
            # provider; its jobs end only while the store holds the key's mark they were taken by.
            self._accepted.discard((provider, provider_batch_id))
            code = "provider_batch_not_found" if error.status == 404 else "provider_batch_rejected"
            await self._lose(provider_batch_id, jobs, code, error.status, owner_gone)
            return
        # Its status check got through: what fails from here (its results read) never counts
        # toward giving it up (``_given_up``).
        self._failing_since.pop((provider, provider_batch_id), None)
        self._undecided.pop((provider, provider_batch_id), None)
        if batch.ended:
            self._seen_ended.add((provider, provider_batch_id))
            if not jobs.ended:
                await self._opened().mark_ended(provider, provider_batch_id)
        if other_key and own_key is not None:
            # This key sees it: the same account's rotated key, the batch's key from now on (a
            # 404 then means lost, as for any batch).
            await self._opened().adopt(provider, provider_batch_id, own_key)
        sent_for = 0.0 if jobs.sent_at is None else self._clock() - jobs.sent_at
        overdue = sent_for > OVERDUE_AFTER_SECONDS
        if not batch.ended and overdue:
            await self._end_overdue(api, provider, batch, jobs, abandon=sent_for > ABANDON_AFTER_SECONDS)
            return
        if not batch.ended:
            if batch.accepted and not jobs.unverified and (provider, provider_batch_id) not in self._accepted:
                # Past the provider's validation: the requests are never sent again (those of a
                # batch that may be another client's are kept until its results tell).
                await self._opened().drop_requests(provider, provider_batch_id)
                self._accepted.add((provider, provider_batch_id))
            if (
                not jobs.waiting
                and not jobs.unverified
                and batch.status not in _CANCELLING
                and provider_batch_id not in self._cancel_asked
            ):
                # Every job of it was cancelled, through a process that cannot reach it (another
                # endpoint's): it is cancelled here, where it was sent, once; else the provider
                # runs and bills it whole.
                self._cancel_asked.add(provider_batch_id)
                await self._cancel_with(api, provider_batch_id)
            return
        # Ended by the cancel past its window that this process asked (``_end_overdue``), or, once
        # past it, by a cancel (one asked before a restart): its unanswered jobs are overdue. A
        # batch that ended on its own (failed, expired) keeps the provider's outcome however late
        # it is read.
        cancelled_overdue = overdue and (provider_batch_id in self._cancel_asked or batch.status in _CANCELLED)
        self._cancel_asked.discard(provider_batch_id)
        self._accepted.discard((provider, provider_batch_id))
        waiting = list(jobs.waiting)
        if batch.retry_later and waiting:
            waiting = await self._requeue(provider, batch, waiting)
        # Made valid text before anything reads them: the store, the ledger, the metrics.
        read = await _bounded(api, api.results(batch), RESULTS_SECONDS, "results read")
        results = {result.custom_id: valid_result(result) for result in read}
        if jobs.unverified and not results.keys() & {*jobs.waiting, *jobs.cancelled}:
            await self._disown(provider, batch.id, jobs, answered=bool(results))
            if results:
                return
        for batch_id in waiting:
            result = results.get(batch_id)
            if (cancelled_overdue and result is None) or (
                overdue and result is not None and result.state is BatchState.CANCELLED
            ):
                # Unanswered when the cancel past its window (``_end_overdue``) ended it.
                result = ItemResult(batch_id, BatchState.EXPIRED, error="batch_overdue")
            elif result is None:
                state = BatchState.EXPIRED if batch.status == "expired" else BatchState.FAILED
                result = ItemResult(batch_id, state, error=batch.error or "no_result")
            await self._settle(batch_id, result)
        for batch_id in jobs.cancelled:
            await self._settle_cancelled(batch_id, results.get(batch_id))
        log.info(
            "batch_ended",
            provider_batch_id=provider_batch_id,
            status=batch.status,
            jobs=len(jobs.waiting),
            cancelled_jobs=len(jobs.cancelled),
        )
        if jobs.unverified and not results:
            return  # its results are gone: whose it was cannot be told, so it is not deleted
        # Every job's end, and every cancelled job's bill, is stored (a store failure above
        # leaves the batch to be read again next round): what the provider keeps of it, prompts
        # and answers, is deleted. In one task a shutdown waits for; what a delete left is tried
        # again in later rounds (``_discard_leftovers``).
        await asyncio.shield(self._keep(self._discard(api, provider, batch, sent_to[0])))

    async def _disown(
        self,
        provider: str,
        provider_batch_id: str,
        jobs: SentJobs,
        *,
        answered: bool,
        gone: GoneMark | None = None,
        resend: bool = True,
    ) -> bool:
        """A batch adopted by its shape (``_adopt_earlier``) whose results name none of its jobs
        (or gone before it was read): when it has results, it is another client's, which is left
        alone (never deleted), and its jobs, never sent, are queued again (those cancelled since
        close unbilled), but for those moved to this key by their lost send's lookup
        (``_rekey_lost_sends``), which end FAILED ``provider_changed``: this key may be another
        account's, and the send's own batch, under the old key, may have answered them. Without
        results (deleted by the provider) whose it was cannot be told: its jobs end with the
        batch's code, and it is not deleted. With ``gone`` (the mark of the key it was adopted
        with, taken as gone), each only while the store still holds that mark; without ``resend``,
        none is queued again: each ends FAILED ``provider_changed``. Returns whether any job was
        queued again, failed or closed (logged ``batch_adoption_undone`` only then)."""
        if not answered:
            log.warning("batch_adoption_unverified", provider_batch_id=provider_batch_id, jobs=len(jobs.waiting))
            return False
        store = self._opened()
        again, failed = await store.disown(provider, provider_batch_id, "provider_changed", gone=gone, resend=resend)
        closed = 0
        for batch_id in jobs.cancelled:
            closed += await store.close_cancelled(batch_id, None, gone=gone)
        if not (again or failed or closed):
            return False
        log.warning(
            "batch_adoption_undone", provider_batch_id=provider_batch_id, jobs=len(again), failed_jobs=len(failed)
        )
        self._wake.set()
        return True

    async def _requeue(self, provider: str, batch: ProviderBatch, waiting: list[str]) -> list[str]:
        """Queue ``waiting`` again, their provider batch refused whole for a while (OpenAI's
        enqueued token limit), to be sent after a wait that doubles (``Backoff``); those past
        ``max_queued_seconds`` by then are left to end with the batch's code. Returns the jobs
        left to end with the batch (a job another worker has queued again is in neither list)."""
        backoff = Backoff(self._config.poll_interval_seconds, _MAX_RESEND_DELAY, self._config.max_queued_seconds)
        again, left = await self._opened().requeue(provider, batch.id, waiting, batch.error, backoff)
        if again:
            log.warning("batch_requeued", provider_batch_id=batch.id, jobs=len(again), reason=batch.error)
        return left

    async def _discard(self, api: BatchAPI, provider: str, batch: ProviderBatch, endpoint: str, tries: int = 0) -> None:
        """``api.discard(batch)``; when some of it is left at the provider, it is tried again after
        a delay that doubles (from the poll interval to an hour) up to ``_DISCARD_TRIES`` times,
        by this process (a restart forgets it: the provider's own expiry deletes it then)."""
        if await api.discard(batch):
            self._leftovers.pop((provider, batch.id), None)
            return
        tries += 1
        if tries >= _DISCARD_TRIES or len(self._leftovers) >= _MAX_LEFTOVERS:
            self._leftovers.pop((provider, batch.id), None)
            log.warning("batch_discard_abandoned", provider=provider, provider_batch_id=batch.id, tries=tries)
            return
        delay = min(_MAX_DISCARD_DELAY, self._config.poll_interval_seconds * 2 ** (tries - 1))
        self._leftovers[(provider, batch.id)] = _Leftover(batch, endpoint, tries, time.monotonic() + delay)

    async def _discard_leftovers(self) -> None:
        """Try again what earlier deletes left at the provider, where the delay has passed."""
        now = time.monotonic()
        for (provider, batch_id), leftover in list(self._leftovers.items()):
            if leftover.due > now:
                continue
            with self._using(provider, leftover.endpoint) as api:
                if api is None or leftover.endpoint is None or not self._reachable(provider, leftover.endpoint):
                    # The provider was removed or now points elsewhere: that endpoint is not ours.
                    self._leftovers.pop((provider, batch_id), None)
                    continue
                await asyncio.shield(
                    self._keep(self._discard(api, provider, leftover.batch, leftover.endpoint, leftover.tries))
                )

    def _owner_gone(self, provider: str, jobs: SentJobs) -> GoneMark | None:
        """Whether a batch another key sent to this URL, which this key does not see, is no live
        account's: sent more than ``OTHER_KEY_LOST_AFTER_SECONDS`` ago and its key marked by no
        process for ENDPOINT_GONE_AFTER_SECONDS (``_watch``): then what still waits is this
        deployment's own (a rotated key's), lost by the provider. A key stays marked while a
        process sends with it, and while a process's status checks of its batches cannot tell
        whether its own key sees them (``_undecided``: the owner's rotated key whose checks
        fail; not once that key got 404 for the batch, nor past ``ABANDON_AFTER_SECONDS``:
        ``_not_told``). The key's last mark, for the write to check (``GoneMark``; its ``seen_at`` None
        for a key no process of this release ever marked: an earlier release sent with it, its
        age alone tells); None while the key is marked, and for a batch a status check found
        ended (its owner reads it, or its key was gone since)."""
        if jobs.ended or jobs.sent_at is None or self._clock() - jobs.sent_at <= OTHER_KEY_LOST_AFTER_SECONDS:
            return None
        return self._key_gone(provider, jobs)

    def _adopted_key_gone(self, provider: str, jobs: SentJobs) -> tuple[GoneMark, bool] | None:
        """The mark of the key another key's batch was sent (or adopted) with, when that key is
        taken as gone, and whether its jobs may be sent again: unmarked for
        ENDPOINT_GONE_AFTER_SECONDS (``_key_gone``: taken for the same account's, they may), or
        one this process rotated away from while no other process has marked it since
        (``_own_mark``: the key in use may be another account's, they may not); None while it
        may be live (another account's deployment's, say)."""
        gone = self._key_gone(provider, jobs)
        if gone is not None:
            return gone, True
        if jobs.key_id is not None and jobs.endpoint is not None:
            owner = (provider, jobs.endpoint, jobs.key_id)
            if owner in self._rotated_keys:
                return self._own_mark(owner), False
        return None

    def _key_gone(self, provider: str, jobs: SentJobs) -> GoneMark | None:
        """The last mark of the key another key's batch was sent with, when no process has
        marked it for ENDPOINT_GONE_AFTER_SECONDS (``_watch``) or none of this release ever has
        (``seen_at`` None); None while it is marked, or for a batch sent with this key."""
        if jobs.key_id is None:
            return None
        owner = (provider, jobs.endpoint or "", jobs.key_id)
        if jobs.endpoint is None or owner in self._unmarked_keys:
            # No keys row names a URL "": a row stored before the URL was, its age alone tells.
            return GoneMark(provider, owner[1], None, 0.0, key_id=jobs.key_id)
        return self._owners_gone.get(owner)

    async def _close_unreadable(self, provider_batch_id: str, jobs: SentJobs, gone: GoneMark) -> None:
        """The jobs cancelled since of a batch found ended that nobody can read (its key gone,
        ``gone``; this key does not see it): closed uncharged, their estimates given back, each
        only while the store still holds the key's mark (an owner back with its key reads it and
        charges their bill). Those still waiting wait for it (``_warn_unread``): a cancel is how
        an operator ends the wait. Only once the last of them was cancelled more than
        ``OTHER_KEY_LOST_AFTER_SECONDS`` ago (``SentJobs.cancelled_at``), whatever the key: an
        owner merely down for a while (its key unmarked for ENDPOINT_GONE_AFTER_SECONDS), or an
        earlier release (which marks no key) still reading it, charges their bill; a bill read
        after that is not charged."""
        cancelled_at = jobs.cancelled_at
        if cancelled_at is None or self._clock() - cancelled_at <= OTHER_KEY_LOST_AFTER_SECONDS:
            return
        closed = 0
        for batch_id in jobs.cancelled:
            closed += await self._opened().close_cancelled(batch_id, None, gone=gone)
        if closed:
            log.warning(
                "batch_lost",
                provider_batch_id=provider_batch_id,
                jobs=0,
                cancelled_jobs=closed,
                status=404,
                error="provider_batch_not_found",
            )

    def _warn_unread(self, provider: str, provider_batch_id: str, jobs: SentJobs) -> None:
        """A batch a status check found ended (billed) whose key no process sends with any more,
        and which this key does not see: nobody can read it, and it waits SUBMITTED, its estimate
        held, with no bound (it is never failed unread: its owner may come back with its key).
        Said at warning, at most every ``_FAILURE_LOG_SECONDS`` per batch, with how long since
        it was sent."""
        now = time.monotonic()
        logged = self._unread.get((provider, provider_batch_id))
        if logged is not None and now - logged < _FAILURE_LOG_SECONDS:
            return
        self._unread[(provider, provider_batch_id)] = now
        log.warning(
            "batch_unread_owner_gone",
            provider=provider,
            provider_batch_id=provider_batch_id,
            jobs=len(jobs.waiting),
            cancelled_jobs=len(jobs.cancelled),
            sent_seconds_ago=None if jobs.sent_at is None else round(self._clock() - jobs.sent_at),
        )

    async def _settle(self, batch_id: str, result: ItemResult) -> None:
        """End one job with its result; charge it once if it succeeded. A job cancelled since
        this round listed it is charged what the provider billed (``_settle_cancelled``).

        In one task a shutdown waits for: the end's write runs in a worker thread to its end
        whatever happens to the poller, so a cancel between that write and the charge would
        leave the job ended and never charged (no round reads it again)."""
        await asyncio.shield(self._keep(self._settle_now(batch_id, result)))

    async def _settle_now(self, batch_id: str, result: ItemResult) -> None:
        store = self._opened()
        if result.state is not BatchState.SUCCEEDED:
            if not await store.finish(batch_id, result.state, error=result.error):
                await self._settle_cancelled_now(batch_id, result)
            return
        status = await store.get_any(batch_id)
        if status is None:
            return
        model = await self._priced(status.job.model, batch_id)
        if model is None:
            await self._fail([batch_id], "model_not_in_catalog")
            log.warning("batch_model_unknown", model=status.job.model, jobs=1)
            return  # without its prices the answer cannot be charged: FAILED, not given away
        usage, estimated = _billed_usage(status.job, model, result)
        cost = cost_of_usage(model, usage, Mode.BATCH)
        answer = BatchResult(result.text, usage, cost, result.finish_reason, result.provider_model, result.tool_calls)
        if not await store.finish(batch_id, BatchState.SUCCEEDED, result=answer):
            # Cancelled (or ended by another worker) since this round listed it.
            await self._settle_cancelled_now(batch_id, result)
            return
        self._charge(status.job, model, answer, AttemptOutcome.COMPLETED, estimated=estimated)
        log.info("batch_job_succeeded", batch_id=batch_id, cost_usd=format_usd(cost))

    async def _settle_cancelled(self, batch_id: str, result: ItemResult | None) -> None:
        """Close a job cancelled after it was sent, its provider batch read: charged once what
        the provider billed for it when it answered it (``result`` SUCCEEDED), else nothing.
        Nothing is done for a job not waiting for its batch (closed by another worker, or one
        whose cancel came before it was sent). In one task a shutdown waits for, as ``_settle``."""
        await asyncio.shield(self._keep(self._settle_cancelled_now(batch_id, result)))

    async def _settle_cancelled_now(self, batch_id: str, result: ItemResult | None) -> None:
        store = self._opened()
        if result is None or result.state is not BatchState.SUCCEEDED:
            await store.close_cancelled(batch_id, None)
            return
        status = await store.get_any(batch_id)
        if status is None:
            return
        model = await self._priced(status.job.model, batch_id)
        if model is None:
            # Without its prices the bill cannot be counted: logged, for the provider's invoice
            # to be checked by hand.
            if await store.close_cancelled(batch_id, None):
                log.warning("batch_cancelled_job_unpriced", batch_id=batch_id, model=status.job.model)
            return
        usage, estimated = _billed_usage(status.job, model, result)
        cost = cost_of_usage(model, usage, Mode.BATCH)
        billed = BatchResult("", usage, cost, result.finish_reason, result.provider_model)
        if not await store.close_cancelled(batch_id, billed):
            return
        self._charge(status.job, model, billed, AttemptOutcome.CANCELLED, estimated=estimated)
        log.info("batch_cancelled_job_billed", batch_id=batch_id, cost_usd=format_usd(cost))

    async def _priced(self, model_id: str, batch_id: str) -> ModelSpec | None:
        """The model of a job the provider answered, for its prices: the current catalog's, else
        (a reload removed it since the job was sent, and the provider bills the answer all the
        same) the model as the catalog had it when the job was queued; None when neither is
        known (a job stored before models were kept with jobs)."""
        try:
            return self._catalog().get(model_id)
        except ModelNotFound:
            kept = await self._opened().model_spec(batch_id)
            if kept is not None:
                log.info("batch_model_left_catalog", batch_id=batch_id, model=model_id)
            return kept

    def _charge(
        self, job: BatchJob, model: ModelSpec, answer: BatchResult, outcome: AttemptOutcome, *, estimated: bool
    ) -> None:
        """Record what the provider billed for ``job``'s answer (``estimated`` where it reported
        no usage: ``_billed_usage``): the ledger, then the metrics."""
        self._ledger.record(
            request_id=job.batch_id,
            decision_id=job.decision_id,
            tenant=job.tenant,
            model=model.id,
            provider=job.provider,
            attempt=1,
            outcome=outcome,
            usage=answer.usage,
            cost_usd=answer.cost_usd,
            estimated=estimated,
        )
        if self._answered is not None:
            delivered = outcome is AttemptOutcome.COMPLETED
            self._answered(model, answer.provider_model, answer.usage, answer.cost_usd, delivered)


def _billed_usage(job: BatchJob, model: ModelSpec, result: ItemResult) -> tuple[Usage, bool]:
    """The usage ``job``'s answer ``result`` is charged, and whether it is estimated: the
    provider's, but for a count its result did not report (a server that sends no ``usage``) or
    one it cannot have used (``reported_usage``'s limits: an input or cache count past
    ``model``'s ``input_limit``, an output past that or its ``output_limit``; logged
    ``provider_usage_implausible``), estimated as a stream's is: the input as the decision
    estimated it, as the model bills it (``BatchQueue._billed_input``, kept with the job: the
    request is gone from the store by now), the output counted in the answer's text and tool
    calls. So no count stored or charged is one a broken server made up (10**19 would not even
    fit the store's integers). An estimate is logged, without the answer or the prompt."""
    usage = result.usage
    input_reported = result.input_reported and believable_input(model, usage)
    # The job's own max_output_tokens went with its request, and the catalog may have been
    # reloaded since the job was sent (a lowered max_output_tokens): an output is past belief
    # only past anything a call on the model could produce, its output or its input limit.
    most_output = max(output_limit(model), input_limit(model))
    output_reported = result.output_reported and usage.output_tokens <= most_output
    implausible = [
        name
        for name, reported, believed in (
            ("input", result.input_reported, input_reported),
            ("output", result.output_reported, output_reported),
        )
        if reported and not believed
    ]
    if implausible:
        warn_implausible(job.provider, model, usage, " and ".join(implausible), most_output, batch_id=job.batch_id)
    if input_reported and output_reported:
        return usage, False
    if not input_reported:
        # Cache counts beside an unreported input say nothing: the whole input is the estimate.
        usage = Usage(input_tokens=job.estimated_input_tokens or 0, output_tokens=usage.output_tokens)
    if not output_reported:
        produced = result.text + "".join(call.name + call.arguments_json for call in result.tool_calls)
        usage = dataclasses.replace(usage, output_tokens=count_text_tokens(produced))
    log.warning(
        "batch_usage_estimated",
        batch_id=job.batch_id,
        model=job.model,
        provider=job.provider,
        input_estimated=not input_reported,
        output_estimated=not output_reported,
    )
    return usage, True


def _item(batch_id: str, model: ModelSpec, request: QueuedRequest) -> BatchItem:
    """The provider batch item of job ``batch_id``."""
    return BatchItem(
        batch_id,
        model.id,
        model.provider_model,
        request.messages,
        request.max_output_tokens,
        request.temperature,
        request.tools,
        stop=request.stop,
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=request.response_format,
    )


def _groups(jobs: list[QueuedJob], max_jobs: int, max_chars: int) -> list[list[QueuedJob]]:
    """``jobs`` in order, cut into groups of at most ``max_jobs`` whose requests hold at most
    ``max_chars`` characters together (a job larger alone is a group alone)."""
    groups: list[list[QueuedJob]] = []
    size = 0
    for job in jobs:
        if not groups or len(groups[-1]) >= max_jobs or size + job.request_chars > max_chars:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.request_chars
    return groups
