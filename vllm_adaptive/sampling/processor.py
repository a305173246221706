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

Per-step work: what a request asked for (its sampler, parameters, temperature) is written once,
when it enters the batch, into pinned host rows and copied (non-blocking) into persistent device
buffers, one cell per request; each sampler group's rows, cells and parameter tensors are built
when the batch changes (V1: `update_state`; MRV2: a new `idx_mapping`) and reused by every step
until it changes again, as vLLM's own MinP processor does. A step is then tensor work on the
device: no tensor built from Python values and no device-to-host read, except that on the V1
runner the token a Mirostat request sampled last is read from its output list (a host list
there) and copied in. On MRV2 it is gathered on the device from the runner's token buffer.

Per-request state (Mirostat's mu) lives on the device, in the request's cell, for the request's
life. Mirostat's update needs, per request, the logsumexp of the row it kept (one float, in the
cell) and the logit of the token it then sampled, read from the logits tensor of that step:
the processor keeps a reference to that tensor (vLLM's own, not a copy) until the next step
reads the sampled tokens' logits from it, so its own memory per step does not grow with the
vocabulary. On the V1 runner that tensor is the one vLLM samples from (after temperature; later
stages only mask tokens, which then cannot be sampled). On MRV2 vLLM divides it by the request's
temperature in place after the processors (`Sampler.apply_sampling_params`, vLLM 0.32), so it
holds the same tempered values the keep-set was computed on.

On the V1 runner a request's state is found through its `SamplingParams` object, which that
runner keeps for a request's whole life, preemptions included: a state parked when its request
leaves the batch (with the update owed for the token sampled last applied then, or that one row
copied if the token is not there yet) comes back when it returns, and is dropped when the
request's params are freed. Model Runner V2 does not keep Mirostat state across preemption: it
frees a preempted request's slot without telling processors and re-adds the request like a new
one (`add_request(slot, params)`, with nothing that identifies it as the same request in every
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

import numpy as np
import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor

from vllm_adaptive import metrics
from vllm_adaptive.config import AdaptiveConfig, SamplingConfig
from vllm_adaptive.faults import injected_faults, raise_if_injected
from vllm_adaptive.sampling import mirostat
from vllm_adaptive.sampling.definition import STATE_KEY
from vllm_adaptive.sampling.dispatch import ENTRIES, SamplerEntry
from vllm_adaptive.sampling.params import (
    PARAMS_BY_KEY,
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


@dataclasses.dataclass(eq=False)
class _RequestState:
    request: SamplerRequest
    params_ref: weakref.ReferenceType[Any]
    temperature: float
    output_ids: list[int] | None  # V1: the runner's live output list; V2: None
    cells: _Cells
    cell: int  # this request's index into the device buffers, for its whole life here
    # V1, set by a step that masked this request's row: its row in that step's logits (which
    # the processor holds until the next step) and the request's length then.
    pending_row: int | None = None
    pending_len: int = -1
    # V1: the one pending row copied out when the request left the batch before its token
    # was in its output list: (row [V] float32, kept logsumexp 0-d).
    saved_row: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mu(self) -> float:
        """Mirostat's mu (bits), read from the device (introspection and tests, not steps)."""
        return float(self.cells.mu[self.cell])


class _Cells:
    """Per-request values in persistent buffers: pinned host rows written when a request enters,
    copied to the device (non-blocking) once before the next step when any changed; and the
    state a step updates on the device (mu, and what Mirostat's next update needs).

    A cell belongs to one request from admission until the request is freed (V1: its params
    object is collected; MRV2: its slot is reused) or degraded to plain sampling. The buffers
    grow (doubling) when more requests hold cells than they have room for.
    """

    def __init__(self, device: torch.device, pin_memory: bool, capacity: int) -> None:
        self.device = device
        self.pin_memory = pin_memory and device.type != "cpu"
        self.keys = tuple(PARAMS_BY_KEY)
        self.key_index = {key: i for i, key in enumerate(self.keys)}
        self.capacity = 0
        self.free: list[int] = []
        self.dirty = False
        self._grow(max(capacity, 8))

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        keys = len(self.keys)

        def grown(
            name: str, shape: tuple[int, ...], dtype: torch.dtype, on_host: bool
        ) -> torch.Tensor:
            if on_host:
                fresh = torch.zeros(shape, dtype=dtype, pin_memory=self.pin_memory)
            else:
                fresh = torch.zeros(shape, dtype=dtype, device=self.device)
            if old:
                fresh[..., :old].copy_(getattr(self, name)[..., :old])
            return fresh

        # Host rows (pinned off CPU): the parameters, temperature, tau and eta of each cell.
        self.values_host = grown("values_host", (keys, capacity), torch.float32, True)
        self.t0_host = grown("t0_host", (capacity,), torch.float32, True)
        self.tau_eta_host = grown("tau_eta_host", (2, capacity), torch.float64, True)
        # Their device copies (the same tensors on CPU).
        if self.device.type == "cpu":
            self.values, self.t0, self.tau_eta = self.values_host, self.t0_host, self.tau_eta_host
        else:
            self.values = grown("values", (keys, capacity), torch.float32, False)
            self.t0 = grown("t0", (capacity,), torch.float32, False)
            self.tau_eta = grown("tau_eta", (2, capacity), torch.float64, False)
        # Device state, updated by the steps themselves.
        self.mu = grown("mu", (capacity,), torch.float64, False)
        self.kept_lse = grown("kept_lse", (capacity,), torch.float32, False)
        # MRV2 only: a pending Mirostat update (its row in the held logits, the length then).
        self.pending = grown("pending", (capacity,), torch.bool, False)
        self.pending_row = grown("pending_row", (capacity,), torch.int64, False)
        self.pending_len = grown("pending_len", (capacity,), torch.int64, False)
        self.free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity
        self.dirty = True

    def claim(self, request: SamplerRequest, temperature: float) -> int:
        """A cell holding this request's values and a fresh Mirostat state (mu = 2 tau)."""
        if not self.free:
            self._grow(2 * self.capacity)
        cell = self.free.pop()
        values = self.values_host.numpy()
        values[:, cell] = float("nan")
        for key, value in request.values.items():
            values[self.key_index[key], cell] = value
        self.t0_host[cell] = temperature
        tau = request.values.get("mirostat_tau")
        if tau is not None:
            self.tau_eta_host[0, cell] = tau
            self.tau_eta_host[1, cell] = request.values["mirostat_eta"]
            self.mu[cell] = mirostat.initial_mu(tau)  # a device write at admission, no read
        self.pending[cell] = False
        self.dirty = True
        return cell

    def release(self, cell: int) -> None:
        if cell not in self.free:  # a state may be dropped after its cell went back
            self.free.append(cell)

    def refresh(self) -> None:
        """Copy the host rows to the device if a request entered since the last copy."""
        if not self.dirty:
            return
        if self.device.type != "cpu":
            self.values.copy_(self.values_host, non_blocking=True)
            self.t0.copy_(self.t0_host, non_blocking=True)
            self.tau_eta.copy_(self.tau_eta_host, non_blocking=True)
        self.dirty = False

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A small host index array on the device: zero-copy on CPU, else pinned + non-blocking.

        Called when the batch changes and, on the V1 runner, for the tokens Mirostat sampled.
        `pin_memory()` takes its block from torch's caching host allocator, which does not hand
        the block out again before the non-blocking copy from it has finished.
        """
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return host
        if self.pin_memory:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=self.pin_memory)


@dataclasses.dataclass
class _Group:
    """One sampler's rows in the current batch layout, with everything a step gives it."""

    entry: SamplerEntry
    slots: np.ndarray  # V1 batch index / MRV2 slot of each row (host; failures, V1 bookkeeping)
    rows: torch.Tensor  # [K] int64: rows of the logits
    cells: torch.Tensor  # [K] int64: the requests' cells
    values: dict[str, torch.Tensor]  # [K] float32 per parameter
    t0: torch.Tensor  # [K] float32
    whole_batch: bool  # V1: every row of the logits, in order
    rows_np: np.ndarray
    # MRV2: the rows whose request has no other row this step (no draft rows): [K'] each.
    single_rows: torch.Tensor | None = None
    single_cells: torch.Tensor | None = None
    single_slots: torch.Tensor | None = None


def _new_state(
    request: SamplerRequest, params: Any, output_ids: list[int] | None, cells: _Cells
) -> _RequestState:
    temperature = float(params.temperature)
    return _RequestState(
        request=request,
        params_ref=weakref.ref(params),
        temperature=temperature,
        output_ids=output_ids,
        cells=cells,
        cell=cells.claim(request, temperature),
    )


class _StateBook:
    """States by row (V1 batch index or V2 slot); states parked, and requests whose sampler
    failed, by their params object (for as long as that object lives)."""

    def __init__(self, release: Callable[[int], None]) -> None:
        self.active: dict[int, _RequestState] = {}
        self._parked: dict[int, _RequestState] = {}
        self._failed: dict[int, weakref.ReferenceType[Any]] = {}
        self._release = release
        self.resumed = 0  # parked states that came back with their request
        self.generation = 0  # changes whenever `active` may have changed

    def park(self, state: _RequestState) -> None:
        params = state.params_ref()
        if params is None:
            self._release(state.cell)
            return
        key = id(params)
        self._parked[key] = state
        weakref.finalize(params, self._forget, key, state)

    def _forget(self, key: int, state: _RequestState) -> None:
        if self._parked.get(key) is state:
            del self._parked[key]
            self._release(state.cell)

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
        state = self._parked.pop(key, None)
        if state is not None:
            self._release(state.cell)
        self._failed[key] = weakref.ref(params)
        weakref.finalize(params, self._failed.pop, key, None)

    def has_failed(self, params: Any) -> bool:
        ref = self._failed.get(id(params))
        return ref is not None and ref() is params

    def drop(self, states: Iterable[_RequestState]) -> None:
        """Remove these states from every row they occupy and free their cells."""
        gone = {id(s): s for s in states}
        for row in [row for row, s in self.active.items() if id(s) in gone]:
            del self.active[row]
        for state in gone.values():
            self._release(state.cell)
        self.generation += 1


class AdaptiveLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):  # type: ignore[misc]
    """Applies the adaptive sampler each request asked for; other rows stay bitwise untouched."""

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        config = AdaptiveConfig.from_vllm_config(vllm_config) or AdaptiveConfig()
        self.config: AdaptiveConfig = config
        self.sampling_defaults: SamplingConfig = config.sampling
        if len(args) == 2:  # V1: (device, is_pin_memory)
            self.runner_interface = "v1"
            self._req_states = None
            device, pin_memory = torch.device(args[0]), bool(args[1])
            scheduler = getattr(vllm_config, "scheduler_config", None)
            capacity = int(getattr(scheduler, "max_num_seqs", 0) or 0)
        elif len(args) == 1:  # MRV2: (req_states)
            self.runner_interface = "v2"
            self._req_states = args[0]
            device = torch.device(getattr(args[0], "device", None) or "cpu")
            pin_memory = device.type == "cuda"
            capacity = int(getattr(args[0], "max_num_reqs", 0) or 0)
        else:
            raise TypeError(
                "AdaptiveLogitsProcessor(vllm_config, device, is_pin_memory) for the V1 runner or "
                f"(vllm_config, req_states) for Model Runner V2; got {1 + len(args)} arguments"
            )
        self._cells = _Cells(device, pin_memory, capacity)
        self._book = _StateBook(self._cells.release)
        # The logits of the latest step that masked a Mirostat row (vLLM's tensor, not a copy):
        # the next step reads the sampled tokens' logits from it.
        self._held: torch.Tensor | None = None
        # Sampler groups of the current batch layout, and what that layout was.
        self._groups: list[_Group] = []
        self._layout: tuple[Any, ...] | None = None
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
                state.pending_row, state.saved_row = None, None
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
        all three cases. Only the host bookkeeping changes here; the next step rebuilds its
        sampler groups from it once.
        """
        if batch_update is None:
            return
        self._book.generation += 1
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
        self._book.generation += 1
        try:
            previous = self._book.active.pop(req_idx, None)  # slots are recycled
            if previous is not None:
                self._cells.release(previous.cell)
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
            self._held = None
            return logits
        try:
            self._apply_step(logits, ctx)
        except Exception:  # outside any one sampler group
            self._fail("apply", list(self._book.active.values()))
            self._held = None
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
            return _new_state(request, params, output_ids, self._cells)
        except Exception:
            self._fail(stage, [], [name])
            try:
                self._book.mark_failed(params)
            except Exception:  # noqa: BLE001 - a params object without weak references
                pass
            return None

    def _apply_step(self, logits: torch.Tensor, ctx: Any) -> None:
        groups = self._sampler_groups(logits, ctx)
        held, self._held = self._held, None
        observed: list[_Group] = []
        for group in groups:
            if not group.entry.stateful:
                continue
            if held is None and not self._any_saved_row(group):
                observed.append(group)
                continue
            ok, _ = self._guarded(group, self._observe_sampled_tokens, group, held)
            if ok:
                observed.append(group)
        if self.runner_interface == "v2":
            self._cells.pending.zero_()  # the held logits are replaced: older updates are void
        masked = False
        for group in groups:
            if group.entry.stateful and not any(g is group for g in observed):
                continue
            ok, kept_lse = self._guarded(group, self._apply_group, logits, group)
            if ok and group.entry.stateful:
                self._note_pending(group, kept_lse)
                masked = True
        if masked:
            self._held = logits

    def _sampler_groups(self, logits: torch.Tensor, ctx: Any) -> list[_Group]:
        """This step's sampler groups: rebuilt only when the batch layout changed."""
        n = logits.shape[0]
        if self.runner_interface == "v1":
            mapping: Any = n
        else:
            slots_np = np.asarray(ctx.idx_mapping_np)
            if len(slots_np) != n:  # speculative decoding: several rows per request
                slots_np = ctx.expanded_idx_mapping.cpu().numpy()
            mapping = slots_np
        layout_same = (
            self._layout is not None
            and self._layout[0] == self._book.generation
            and self._layout[1] == logits.device
            and (mapping == self._layout[2] if self.runner_interface == "v1"
                 else np.array_equal(mapping, self._layout[2]))
        )
        if layout_same:
            return self._groups
        self._cells.refresh()
        self._groups = self._build_groups(n, mapping, logits)
        copy = mapping if self.runner_interface == "v1" else np.array(mapping, copy=True)
        self._layout = (self._book.generation, logits.device, copy)
        return self._groups

    def _build_groups(self, n: int, mapping: Any, logits: torch.Tensor) -> list[_Group]:
        active = self._book.active
        if self.runner_interface == "v1":
            slots = np.arange(n)
        else:
            slots = mapping.astype(np.int64)
        names = list(ENTRIES)
        code_of: dict[int, int] = {}
        cell_of: dict[int, int] = {}
        for slot, state in active.items():
            code_of[slot] = names.index(state.request.name)
            cell_of[slot] = state.cell
        codes = np.array([code_of.get(int(slot), -1) for slot in slots], dtype=np.int64)
        cells = np.array([cell_of.get(int(slot), -1) for slot in slots], dtype=np.int64)
        single = np.ones(len(slots), dtype=bool)
        if self.runner_interface == "v2" and len(slots):
            _, inverse, counts = np.unique(slots, return_inverse=True, return_counts=True)
            single = counts[inverse] == 1
        groups = []
        to_device = self._cells.to_device
        for code in np.unique(codes[codes >= 0]):
            entry = ENTRIES[names[code]]
            rows_np = np.flatnonzero(codes == code)
            rows = to_device(rows_np)
            cell_index = to_device(cells[rows_np])
            values = {
                p.key: self._cells.values[self._cells.key_index[p.key]].index_select(0, cell_index)
                for p in entry.params
            }
            group = _Group(
                entry=entry,
                slots=slots[rows_np],
                rows=rows,
                cells=cell_index,
                values=values,
                t0=self._cells.t0.index_select(0, cell_index),
                whole_batch=(
                    self.runner_interface == "v1"
                    and logits.dtype == torch.float32
                    and len(rows_np) == n
                ),
                rows_np=rows_np,
            )
            if entry.stateful and self.runner_interface == "v2":
                one = single[rows_np]
                group.single_rows = to_device(rows_np[one])
                group.single_cells = to_device(cells[rows_np][one])
                group.single_slots = to_device(slots[rows_np][one])
            groups.append(group)
        return groups

    def _states(self, group: _Group) -> list[_RequestState]:
        active = self._book.active
        states = {id(active[s]): active[s] for s in group.slots.tolist() if s in active}
        return list(states.values())

    def _any_saved_row(self, group: _Group) -> bool:
        if self.runner_interface != "v1":
            return False
        return any(s.saved_row is not None for s in self._states(group))

    def _observe_sampled_tokens(self, group: _Group, held: torch.Tensor | None) -> None:
        """Update mu from the token each request sampled after the previous masked step."""
        cells = self._cells
        if self.runner_interface == "v2":
            if held is None:
                return
            slots = group.single_slots
            cell = group.single_cells
            assert slots is not None and cell is not None and self._req_states is not None
            length = self._req_states.total_len.gpu.index_select(0, slots).long()
            valid = cells.pending.index_select(0, cell) & (
                length == cells.pending_len.index_select(0, cell) + 1
            )
            position = (length - 1).clamp(min=0)
            token = self._req_states.all_token_ids.gpu[slots, position].long()
            row = cells.pending_row.index_select(0, cell).clamp(max=held.shape[0] - 1)
            token_logit = held[row, token.clamp(0, held.shape[1] - 1)].float()
            surprise = mirostat.observed_surprise(token_logit, cells.kept_lse.index_select(0, cell))
            self._update_mu(cell, surprise, valid)
            return
        # V1: the sampled tokens are in the requests' output lists, on the host.
        cells_at: list[int] = []
        rows_at: list[int] = []
        tokens: list[int] = []
        for state in self._states(group):
            pending_row = state.pending_row
            saved = state.saved_row
            state.pending_row, state.saved_row = None, None
            if pending_row is None and saved is None:
                continue
            output_ids = state.output_ids
            if output_ids is None or len(output_ids) != state.pending_len + 1:
                continue  # a step was skipped
            token = output_ids[-1]
            if saved is not None:  # left the batch before its token arrived: its own row
                row_logits, lse = saved
                surprise = mirostat.observed_surprise(row_logits[token], lse).reshape(1)
                cell = torch.tensor([state.cell], device=row_logits.device)
                self._update_mu(cell, surprise, None)
                continue
            cells_at.append(state.cell)
            rows_at.append(pending_row)  # type: ignore[arg-type]
            tokens.append(token)
        if not cells_at or held is None:
            return
        index = cells.to_device(np.array([cells_at, rows_at, tokens], dtype=np.int64))
        token_logit = held[index[1], index[2]].float()
        surprise = mirostat.observed_surprise(token_logit, cells.kept_lse.index_select(0, index[0]))
        self._update_mu(index[0], surprise, None)

    def _update_mu(
        self, cell: torch.Tensor, surprise: torch.Tensor, valid: torch.Tensor | None
    ) -> None:
        """mu <- mu - eta * (surprise - tau) on the device, for the cells where `valid` and the
        token was in the keep-set (finite surprise; another stage may have changed the set)."""
        cells = self._cells
        mu = cells.mu.index_select(0, cell)
        tau_eta = cells.tau_eta.index_select(1, cell)
        surprise = surprise.double()
        moved = mu - tau_eta[1] * (surprise - tau_eta[0])
        keep = torch.isfinite(surprise)
        if valid is not None:
            keep = keep & valid
        cells.mu.index_copy_(0, cell, torch.where(keep, moved, mu))

    def _note_pending(self, group: _Group, kept_lse: torch.Tensor) -> None:
        """After a masked step: what the next step needs to update each request's mu."""
        cells = self._cells
        if self.runner_interface == "v2":
            assert group.single_rows is not None and group.single_cells is not None
            if group.single_rows.numel() == 0:
                return
            # Under speculative decoding (several rows per request) mu follows committed tokens
            # only from single-row steps.
            position = torch.searchsorted(group.rows, group.single_rows)
            cell = group.single_cells
            cells.kept_lse.index_copy_(0, cell, kept_lse.index_select(0, position).float())
            cells.pending_row.index_copy_(0, cell, group.single_rows)
            assert group.single_slots is not None and self._req_states is not None
            length = self._req_states.total_len.gpu.index_select(0, group.single_slots).long()
            cells.pending_len.index_copy_(0, cell, length)
            cells.pending.index_fill_(0, cell, True)
            return
        cells.kept_lse.index_copy_(0, group.cells, kept_lse.float())
        active = self._book.active
        for slot, row in zip(group.slots.tolist(), group.rows_np.tolist()):
            state = active.get(slot)
            if state is None:
                continue
            state.pending_row = row
            state.pending_len = len(state.output_ids) if state.output_ids is not None else -1

    def _guarded(self, group: _Group, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Run one sampler step for `group`; on failure, serve its requests plainly from now on.

        Returns (True, fn's result), or (False, None) after a failure, which is logged and
        counted. Logits rows are written only once a sampler has finished, so a failure leaves
        them as they were.
        """
        try:
            return True, fn(*args)
        except Exception:  # a policy failure must never take the engine down
            self._fail("apply", self._states(group))
            return False, None

    def _apply_group(self, logits: torch.Tensor, group: _Group) -> torch.Tensor | None:
        """Apply one sampler to its requests' rows; Mirostat returns the kept logsumexp [K]."""
        entry = group.entry
        values = dict(group.values)
        if entry.stateful:
            values[STATE_KEY] = self._cells.mu.index_select(0, group.cells).float()
        t0 = group.t0
        if group.whole_batch:
            # Every row of the batch: the sampler works on the logits in place (each computes
            # before it writes, so a failure still leaves them as they were).
            raise_if_injected(APPLY_FAULT)
            return entry.apply(logits, values, t0)
        selected = logits.index_select(0, group.rows)
        if self.runner_interface == "v1":
            scaled = selected.float()  # V1 runs us after temperature
        else:  # MRV2 runs us before temperature: apply the sampler at the request's temperature
            scaled = selected.float() / t0.unsqueeze(-1)
        kept_lse = entry.apply(scaled, values, t0)
        if self.runner_interface == "v1":
            out = scaled
        elif entry.rescales:  # vLLM divides by the request's temperature after us
            out = scaled * t0.unsqueeze(-1)
        else:
            out = selected.masked_fill(scaled == float("-inf"), float("-inf"))
        raise_if_injected(APPLY_FAULT)  # the sampler has run; its rows are not written yet
        logits.index_copy_(0, group.rows, out.to(logits.dtype))
        return kept_lse

    def _save_pending(self, state: _RequestState) -> None:
        """A request leaves the batch with a Mirostat update outstanding: apply it now if its
        token is in its output list; else copy its one row out of the held logits."""
        row, state.pending_row = state.pending_row, None
        if row is None or self._held is None or state.output_ids is None:
            return
        held = self._held
        length = len(state.output_ids)
        cell = torch.tensor([state.cell], device=held.device)
        if length == state.pending_len + 1:
            token_logit = held[row, state.output_ids[-1]].float().reshape(1)
            kept_lse = self._cells.kept_lse.index_select(0, cell)
            surprise = mirostat.observed_surprise(token_logit, kept_lse)
            self._update_mu(cell, surprise, None)
        elif length == state.pending_len:
            state.saved_row = (held[row].float().clone(), self._cells.kept_lse[state.cell].clone())
