"""A CompactingScheduler that records what the tests' references need (engine core in process)."""

from __future__ import annotations

from vllm_adaptive.kvcache.scheduler import CompactingScheduler


class RecordingScheduler(CompactingScheduler):
    """Also records, per request, the output tokens it had at each preemption, and the largest
    number of requests running at once."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.preempted_at: dict[str, list[int]] = {}
        self.peak_running = 0

    def schedule(self, throttle_prefills: bool = False):  # noqa: ANN201
        output = super().schedule(throttle_prefills)
        self.peak_running = max(self.peak_running, len(self.running))
        return output

    def _free_request_blocks(self, request) -> None:  # noqa: ANN001
        if not request.is_finished():
            self.preempted_at.setdefault(request.request_id, []).append(request.num_output_tokens)
        super()._free_request_blocks(request)
