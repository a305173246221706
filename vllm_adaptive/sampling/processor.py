"""The logits processor that applies adaptive samplers inside vLLM, on both runner interfaces.

vLLM has two logits-processor interfaces: the V1 runner's (CPU, and GPU with
`VLLM_USE_V2_MODEL_RUNNER=0`) and Model Runner V2's. `AdaptiveLogitsProcessor` subclasses both
and tells them apart by its constructor's arguments, so one class loads under either runner.

Each step the rows of the requests that chose a sampler are grouped by sampler and each group is
handled by one batched call (`dispatch.ENTRIES`); rows of other requests are never written.
V1: the processor declares itself argmax-invariant (every sampler keeps the top token), so vLLM
runs it after temperature (and after min-p), before top-k/top-p: the samplers see the tempered
distribution, as in llama.cpp's chain (temperature, then mirostat). MRV2 runs custom processors
before temperature, so there the processor divides by the request's temperature itself, applies
the sampler, and hands back the unscaled row (masked samplers: the same entries masked; dynamic
temperature: the new row times the request's temperature, which vLLM then divides out).

Per-request state (Mirostat's mu) lives in `_RequestState`. On the V1 runner it is found through
the request's `SamplingParams` object, which that runner keeps for a request's whole life,
preemptions included: a state parked when its request leaves the batch comes back when it
returns (with the update owed for the token sampled last), and is dropped when the request's
params are freed. Model Runner V2 does not keep Mirostat state across preemption: it frees a
preempted request's slot without telling processors and re-adds the request like a new one
(`add_request(slot, params)`, with nothing that identifies it as the same request in every
executor), so a resumed request's mu starts again at 2 * tau.

Failures: every path vLLM calls per request or per step (`update_state`, `add_request`,
`apply_staged_writes`, `apply`) catches its own exceptions. A failure degrades the affected
requests to plain sampling for the rest of their lives (their logits rows are left as vLLM made
them, from the failing step on), is counted per sampler and stage (`failure_counts`, on a
server `vllm_adaptive:sampler_failures_total`) and logged once per sampler and stage, and never
reaches the engine. The fault points `sampler:update_state` and `sampler:apply` of
`vllm_adaptive.faults` make those paths fail on purpose, for tests.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor

from vllm_adaptive import metrics
from vllm_adaptive.config import AdaptiveConfig, SamplingConfig
from vllm_adaptive.faults import injected_faults, raise_if_injected
from vllm_adaptive.sampling import mirostat
from vllm_adaptive.sampling.dispatch import ENTRIES, SamplerEntry
from vllm_adaptive.sampling.params import (
    SamplerParamError,
    SamplerRequest,
    parse_sampler_request,
)
from vllm_adaptive.worker_metrics import SAMPLER, SnapshotPublisher

try:  # Model Runner V2's interface (vLLM >= 0.32); absent on older versions.
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsProcessor as V2LogitsProcessor,
    )
except ImportError:  # pragma: no cover - depends on the installed vLLM
    V2LogitsProcessor = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from vllm import SamplingParams

logger = logging.getLogger(__name__)

# Below this temperature vLLM samples greedily; sampler state is not tracked for such rows.
_GREEDY_TEMPERATURE = 1e-5

# Fault points (vllm_adaptive.faults): a request's admission into the processor (V1
# update_state, MRV2 add_request), and a sampler group's step in apply.
UPDATE_FAULT = "sampler:update_state"
APPLY_FAULT = "sampler:apply"

# The stages a failure is counted under, per runner interface: the vLLM method it happened in.
STAGES = {"v1": ("update_state", "apply"), "v2": ("add_request", "apply")}
# The sampler label of a failure that cannot be told apart by request.
UNKNOWN_SAMPLER = "unknown"


_logged_once: set[str] = set()


def _log_once(kind: str, message: str) -> None:
    """Log `message` with the current exception the first time `kind` happens in this process."""
    if kind not in _logged_once:
        _logged_once.add(kind)
        logger.exception(message)


def _count(counter: Callable[[str], None], label: str) -> None:
    """Count at admission; a metrics failure never refuses or fails the request."""
    try:
        counter(label)
    except Exception:  # noqa: BLE001
        _log_once("metrics", "vllm-adaptive: counting a request on /metrics failed (logged once)")


@dataclasses.dataclass
class _RequestState:
    request: SamplerRequest
    params_ref: weakref.ReferenceType[Any]
    temperature: float
    output_ids: list[int] | None  # V1: the runner's live output list; V2: None
    mu: float
    # Set by a step that masked this request's row: its index into that step's saved rows and
    # the request's length then. The next step reads the sampled token and updates mu.
    pending_index: int | None = None
    pending_len: int = -1
    # A pending row copied out when the request left the batch with an update outstanding.
    saved_row: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class _Row:
    row: int  # index into this step's logits
    slot: int  # V1: the same batch index; MRV2: the request's persistent slot
    state: _RequestState
    single: bool  # the request owns exactly one row this step (no draft rows)


def _new_state(request: SamplerRequest, params: Any, output_ids: list[int] | None) -> _RequestState:
    tau = request.values.get("mirostat_tau")
    return _RequestState(
        request=request,
        params_ref=weakref.ref(params),
        temperature=float(params.temperature),
        output_ids=output_ids,
        mu=mirostat.initial_mu(tau) if tau is not None else 0.0,
    )


class _StateBook:
    """States by row (V1 batch index or V2 slot); states parked, and requests whose sampler
    failed, by their params object (for as long as that object lives)."""

    def __init__(self) -> None:
        self.active: dict[int, _RequestState] = {}
        self._parked: dict[int, _RequestState] = {}
        self._failed: dict[int, weakref.ReferenceType[Any]] = {}
        self.resumed = 0  # parked states that came back with their request

    def park(self, state: _RequestState) -> None:
        params = state.params_ref()
        if params is None:
            return
        key = id(params)
        self._parked[key] = state
        weakref.finalize(params, self._parked.pop, key, None)

    def resume(self, params: Any) -> _RequestState | None:
        state = self._parked.pop(id(params), None)
        if state is not None and state.params_ref() is params:
            self.resumed += 1
            return state
        return None

    def parked(self) -> list[_RequestState]:
        return list(self._parked.values())

    def mark_failed(self, params: Any) -> None:
        """Serve this request plainly for the rest of its life, preemptions included."""
        key = id(params)
        self._parked.pop(key, None)
        self._failed[key] = weakref.ref(params)
        weakref.finalize(params, self._failed.pop, key, None)

    def has_failed(self, params: Any) -> bool:
        ref = self._failed.get(id(params))
        return ref is not None and ref() is params

    def drop(self, states: Iterable[_RequestState]) -> None:
        """Remove these states from every row they occupy."""
        gone = {id(s) for s in states}
        for row in [row for row, s in self.active.items() if id(s) in gone]:
            del self.active[row]


class AdaptiveLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):  # type: ignore[misc]
    """Applies the adaptive sampler each request asked for; other rows stay bitwise untouched."""

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        config = AdaptiveConfig.from_vllm_config(vllm_config) or AdaptiveConfig()
        self.config: AdaptiveConfig = config
        self.sampling_defaults: SamplingConfig = config.sampling
        self._book = _StateBook()
        # Rows masked by the latest step, kept to measure the surprise of what gets sampled.
        self._prev_rows: torch.Tensor | None = None
        self._prev_lse: torch.Tensor | None = None
        if len(args) == 2:  # V1: (device, is_pin_memory)
            self.runner_interface = "v1"
            self._req_states = None
        elif len(args) == 1:  # MRV2: (req_states)
            self.runner_interface = "v2"
            self._req_states = args[0]
        else:
            raise TypeError(
                "AdaptiveLogitsProcessor(vllm_config, device, is_pin_memory) for the V1 runner or "
                f"(vllm_config, req_states) for Model Runner V2; got {1 + len(args)} arguments"
            )
        # Requests degraded to plain sampling, by (sampler, stage); every pair starts at zero.
        self._failures: dict[tuple[str, str], int] = {
            (name, stage): 0 for name in ENTRIES for stage in STAGES[self.runner_interface]
        }
        self._logged_failures: set[tuple[str, str]] = set()
        self._invalid_args_logged = False
        injected_faults()  # a misspelt fault point stops the engine here, at start-up
        self._publisher = self._start_publisher()

    # ---- admission (API server process) -------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject bad sampler arguments at admission (HTTP 400) and count admitted requests."""
        from vllm.exceptions import VLLMValidationError

        from vllm_adaptive import plugin

        try:
            request = parse_sampler_request(sampling_params.extra_args)
        except SamplerParamError as e:
            _count(metrics.count_rejected, e.parameter)
            raise VLLMValidationError(str(e), parameter=e.parameter, value=e.value) from None
        except Exception:  # a bug, not the request's fault: the worker parses again, guarded
            _log_once("validate_params", "vllm-adaptive: checking a request's sampler arguments "
                      "failed; the request is admitted and the worker serves it plainly if its own "
                      "parse fails too (logged once)")
            return
        config = plugin.frontend_config()
        if request is not None and config is not None and not config.sampling.enabled:
            metrics.count_rejected("adaptive_sampler")
            raise VLLMValidationError(
                "adaptive samplers are disabled on this server (sampling.enabled: false in its "
                f"--adaptive-config); got adaptive_sampler={request.name!r}",
                parameter="adaptive_sampler",
                value=request.name,
            )
        if config is None or config.metrics.enabled:
            _count(metrics.count_request, request.name if request else "none")

    # ---- failures -----------------------------------------------------------------------

    @property
    def failures(self) -> int:
        """Requests degraded to plain sampling since the processor was built."""
        return sum(self._failures.values())

    def failure_counts(self) -> dict[tuple[str, str], int]:
        """Requests degraded to plain sampling, by (sampler, stage), zeros included."""
        return dict(self._failures)

    def metrics_snapshot(self) -> dict[str, Any]:
        """What the worker publishes for `/metrics` (vllm_adaptive.worker_metrics): plain data."""
        return {
            "runner_interface": self.runner_interface,
            "failures": [
                {"sampler": name, "stage": stage, "requests": count}
                for (name, stage), count in sorted(self.failure_counts().items())
            ],
        }

    def worker_state(self) -> dict[str, Any]:
        """Plain data for `vllm_adaptive.introspection`: the config, requests and failures."""
        return {
            "runner_interface": self.runner_interface,
            "config": self.config.to_dict(),
            "active_requests": len(self._book.active),
            "parked_requests": len(self._book.parked()),
            "resumed_requests": self._book.resumed,
            "failures": self.failures,
            "failure_counts": self.metrics_snapshot()["failures"],
        }

    def _start_publisher(self) -> SnapshotPublisher | None:
        try:
            publisher = SnapshotPublisher.from_environment(SAMPLER, self.metrics_snapshot)
        except Exception:  # metrics must not stop the engine
            logger.exception("vllm-adaptive: sampler failures will not appear on /metrics")
            return None
        if publisher is not None:
            publisher.touch()  # publish the zeros: the counters exist before a first failure
        return publisher

    def _fail(self, stage: str, states: Sequence[_RequestState], names: Sequence[str] = ()) -> None:
        """Serve `states`' requests plainly from now on; count and log the failure (called from
        an `except` block: logs its traceback the first time per sampler and stage)."""
        try:
            self._book.drop(states)
            for state in states:
                state.pending_index, state.saved_row = None, None
                params = state.params_ref()
                if params is not None:
                    self._book.mark_failed(params)
            labels = [s.request.name for s in states] + list(names)
            for name in labels:
                self._failures[(name, stage)] = self._failures.get((name, stage), 0) + 1
            for name in sorted(set(labels)):
                kind = (name, stage)
                count = labels.count(name)
                if kind in self._logged_failures:
                    logger.debug("vllm-adaptive: sampler %s failed in %s on %d more request(s)",
                                 name, stage, count)
                    continue
                self._logged_failures.add(kind)
                logger.exception(
                    "vllm-adaptive: sampler %s failed in %s on %d request(s); they continue with "
                    "plain sampling (logged once per sampler and stage; counted in "
                    "vllm_adaptive:sampler_failures_total)", name, stage, count,
                )
            if self._publisher is not None:
                self._publisher.touch()
        except Exception:  # noqa: BLE001 - bookkeeping of a failure must not fail the engine
            logger.debug("vllm-adaptive: could not record a sampler failure", exc_info=True)

    # ---- V1 runner interface ------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removed, then added, then moved (vLLM's order of events).

        A request that leaves the batch (finished or preempted) is not always in `removed`: vLLM
        lists only the indices nothing else took, so a leaving request's index may come back as
        the index of an added request or as the target of a one-way move. Its state is parked in
        all three cases.
        """
        if batch_update is None:
            return
        try:
            for row in batch_update.removed:
                self._park(row)
            for row, params, _prompt_ids, output_ids in batch_update.added:
                self._park(row)
                state = self._admit(params, output_ids, "update_state")
                if state is not None:
                    self._book.active[row] = state
            for a, b, direction in batch_update.moved:
                state_a = self._book.active.pop(a, None)
                if direction == MoveDirectionality.SWAP:
                    state_b = self._book.active.pop(b, None)
                    if state_b is not None:
                        self._book.active[a] = state_b
                else:  # a -> b fills the index of a request that left the batch (not in removed)
                    self._park(b)
                if state_a is not None:
                    self._book.active[b] = state_a
        except Exception:  # outside any one request: rows and states may no longer match
            self._fail("update_state", list(self._book.active.values()))
            self._book.active.clear()

    # ---- Model Runner V2 interface ------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        try:
            self._book.active.pop(req_idx, None)  # slots are recycled: drop the previous occupant
            state = self._admit(sampling_params, None, "add_request")
            if state is None:
                return False
            self._book.active[req_idx] = state
            return True
        except Exception:
            self._book.active.pop(req_idx, None)
            self._fail("add_request", [], [UNKNOWN_SAMPLER])
            return False

    def apply_staged_writes(self) -> None:
        return None

    # ---- both -----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self._book.active:
            return logits
        try:
            self._apply_step(logits, ctx)
        except Exception:  # outside any one sampler group
            self._fail("apply", list(self._book.active.values()))
            self._prev_rows = self._prev_lse = None
        return logits

    # ---- internals ----------------------------------------------------------------------

    def _park(self, row: int) -> None:
        """The request at `row` leaves the batch: keep its state for when it comes back."""
        state = self._book.active.pop(row, None)
        if state is None:
            return
        try:
            self._save_pending(state)
            self._book.park(state)
        except Exception:
            self._fail("update_state", [state])

    def _admit(self, params: Any, output_ids: list[int] | None, stage: str) -> _RequestState | None:
        """The state of a request entering the batch, or None to serve it plainly."""
        if params is None:
            return None
        name = UNKNOWN_SAMPLER
        try:
            if self._book.has_failed(params):
                return None
            resumed = self._book.resume(params)
            if resumed is not None:
                resumed.output_ids = output_ids
                return resumed
            try:
                request = parse_sampler_request(params.extra_args, self.sampling_defaults)
            except SamplerParamError:
                # Admission validates first; reaching here means a caller skipped it.
                if not self._invalid_args_logged:
                    self._invalid_args_logged = True
                    logger.warning("vllm-adaptive: invalid sampler arguments reached the worker; "
                                   "those requests are sampled plainly (logged once)")
                return None
            if request is None or float(params.temperature) < _GREEDY_TEMPERATURE:
                return None  # greedy rows take the argmax, which every sampler keeps
            name = request.name
            raise_if_injected(UPDATE_FAULT)
            return _new_state(request, params, output_ids)
        except Exception:
            self._fail(stage, [], [name])
            try:
                self._book.mark_failed(params)
            except Exception:  # noqa: BLE001 - a params object without weak references
                pass
            return None

    def _apply_step(self, logits: torch.Tensor, ctx: Any) -> None:
        rows = self._rows_this_step(logits, ctx)
        stateful = [r for r in rows if ENTRIES[r.state.request.name].stateful]
        if stateful and not self._guarded(stateful, self._observe_sampled_tokens, stateful)[0]:
            rows = [r for r in rows if not ENTRIES[r.state.request.name].stateful]
        groups: dict[str, list[_Row]] = {}
        for r in rows:
            groups.setdefault(r.state.request.name, []).append(r)
        saved_rows: list[torch.Tensor] = []
        saved_lse: list[torch.Tensor] = []
        for name, group in groups.items():
            entry = ENTRIES[name]
            ok, result = self._guarded(group, self._apply_group, logits, entry, group)
            if not (ok and entry.stateful):
                continue
            scaled, kept_lse = result
            offset = sum(part.shape[0] for part in saved_rows)
            saved_rows.append(scaled)
            saved_lse.append(kept_lse)
            for i, r in enumerate(group):
                # Under speculative decoding (several rows per request) mu follows committed
                # tokens only from single-row steps.
                r.state.pending_index = offset + i if r.single else None
                r.state.pending_len = self._current_len(r.state, r.slot)
        if saved_rows:
            self._prev_rows = saved_rows[0] if len(saved_rows) == 1 else torch.cat(saved_rows)
            self._prev_lse = saved_lse[0] if len(saved_lse) == 1 else torch.cat(saved_lse)
        else:
            self._prev_rows = self._prev_lse = None

    def _rows_this_step(self, logits: torch.Tensor, ctx: Any) -> list[_Row]:
        """Every logits row an adaptive sampler applies to this step."""
        if self.runner_interface == "v1":
            n = logits.shape[0]
            return [_Row(row, row, s, True) for row, s in sorted(self._book.active.items()) if row < n]
        slots: Sequence[int] = ctx.idx_mapping_np.tolist()
        if len(slots) != logits.shape[0]:  # speculative decoding: several rows per request
            slots = ctx.expanded_idx_mapping.tolist()
        counts: dict[int, int] = {}
        for slot in slots:
            counts[slot] = counts.get(slot, 0) + 1
        active = self._book.active
        return [
            _Row(row, slot, active[slot], counts[slot] == 1)
            for row, slot in enumerate(slots)
            if slot in active
        ]

    def _current_len(self, state: _RequestState, slot: int) -> int:
        if state.output_ids is not None:
            return len(state.output_ids)
        return int(self._req_states.total_len.gpu[slot])

    def _last_token(self, state: _RequestState, slot: int) -> int:
        if state.output_ids is not None:
            return state.output_ids[-1]
        total = int(self._req_states.total_len.gpu[slot])
        return int(self._req_states.all_token_ids.gpu[slot, total - 1])

    def _observe_sampled_tokens(self, rows: list[_Row]) -> None:
        """Update mu from the token each request sampled after the previous masked step."""
        index: list[int] = []
        tokens: list[int] = []
        waiting: list[_RequestState] = []
        for r in rows:
            state = r.state
            if state.pending_index is None and state.saved_row is None:
                continue
            if self._current_len(state, r.slot) != state.pending_len + 1:
                state.pending_index, state.saved_row = None, None  # a step was skipped
                continue
            token = self._last_token(state, r.slot)
            if state.saved_row is not None:
                row_logits, lse = state.saved_row
                state.saved_row = None
                self._update(state, mirostat.observed_surprise(row_logits[token], lse).item())
                continue
            index.append(state.pending_index)  # type: ignore[arg-type]
            tokens.append(token)
            waiting.append(state)
        if waiting:
            assert self._prev_rows is not None and self._prev_lse is not None
            idx = torch.tensor(index, device=self._prev_rows.device)
            tok = torch.tensor(tokens, device=self._prev_rows.device)
            surprise = mirostat.observed_surprise(self._prev_rows[idx, tok], self._prev_lse[idx])
            for state, value in zip(waiting, surprise.tolist()):
                self._update(state, value)

    def _update(self, state: _RequestState, surprise: float) -> None:
        state.pending_index = None
        if surprise == float("inf"):  # sampled outside our keep-set (another stage changed it)
            return
        values = state.request.values
        state.mu = mirostat.update_mu(state.mu, surprise, values["mirostat_tau"], values["mirostat_eta"])

    def _guarded(self, rows: list[_Row], fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Run one sampler step for `rows`; on failure, serve those requests plainly from now on.

        Returns (True, fn's result), or (False, None) after a failure, which is logged and
        counted. Logits rows are written only once a sampler has finished, so a failure leaves
        them as they were.
        """
        try:
            return True, fn(*args)
        except Exception:  # a policy failure must never take the engine down
            self._fail("apply", list({id(r.state): r.state for r in rows}.values()))
            return False, None

    @staticmethod
    def _group_params(group: list[_Row], entry: SamplerEntry, device: torch.device) -> dict[str, torch.Tensor]:
        """One float32 tensor [K] per parameter of the group's sampler (and Mirostat's mu)."""
        params = {
            key: torch.tensor(
                [r.state.request.values[key] for r in group], dtype=torch.float32, device=device
            )
            for key in group[0].state.request.values
        }
        if entry.stateful:
            params["mu"] = torch.tensor([r.state.mu for r in group], dtype=torch.float32, device=device)
        return params

    def _apply_group(
        self, logits: torch.Tensor, entry: SamplerEntry, group: list[_Row]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Apply one sampler to its requests' rows; Mirostat returns (rows, kept lse) to keep."""
        device = logits.device
        t0 = torch.tensor([r.state.temperature for r in group], dtype=torch.float32, device=device)
        # V1, one stateless sampler for the whole batch, float32: work on the logits in place
        # (every sampler computes before it writes, so a failure still leaves them as they were).
        whole_batch = (
            self.runner_interface == "v1"
            and not entry.stateful
            and logits.dtype == torch.float32
            and len(group) == logits.shape[0]
            and all(r.row == i for i, r in enumerate(group))
        )
        if whole_batch:
            raise_if_injected(APPLY_FAULT)
            entry.apply(logits, self._group_params(group, entry, device), t0)
            return None
        index = torch.tensor([r.row for r in group], device=device)
        selected = logits.index_select(0, index)
        if self.runner_interface == "v1":
            scaled = selected.float()  # V1 runs us after temperature
        else:  # MRV2 runs us before temperature: apply the sampler at the request's temperature
            scaled = selected.float() / t0.unsqueeze(-1)
        kept_lse = entry.apply(scaled, self._group_params(group, entry, device), t0)
        if self.runner_interface == "v1":
            out = scaled
        elif entry.rescales:  # vLLM divides by the request's temperature after us
            out = scaled * t0.unsqueeze(-1)
        else:
            out = selected.masked_fill(scaled == float("-inf"), float("-inf"))
        raise_if_injected(APPLY_FAULT)  # the sampler has run; its rows are not written yet
        logits.index_copy_(0, index, out.to(logits.dtype))
        if kept_lse is None:
            return None
        return scaled, kept_lse

    def _save_pending(self, state: _RequestState) -> None:
        """Copy a request's pending row out of the shared buffer before it leaves the batch."""
        if state.pending_index is not None and self._prev_rows is not None:
            assert self._prev_lse is not None
            state.saved_row = (
                self._prev_rows[state.pending_index].clone(),
                self._prev_lse[state.pending_index].clone(),
            )
        state.pending_index = None
