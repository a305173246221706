"""Facts about the installed vLLM that KV compaction (issue #18) is designed on.

The design (scheduler decides how many tokens a request keeps and frees its tail blocks; the
worker moves the kept tokens to the request's first slots; seq_lens and slot mapping use the
physical length while positions stay logical) relies on each of these; a vLLM where one moved
fails here first, naming it. The CPU attention kernels' layout and position-free attention are
pinned by tests/contract/kv_compaction_probe_cases.py, run in its own process below.
"""

from __future__ import annotations

import inspect
import io
import pickle
import re
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch
from own_process import assert_all_pass_in_own_process

PROBE = Path(__file__).with_name("kv_compaction_probe_cases.py")


def code_reads(function: object, dotted: str) -> int:
    """How many times the code of `function` (strings and comments left out) says `dotted`."""
    source = textwrap.dedent(inspect.getsource(function))
    names = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type in (tokenize.NAME, tokenize.OP)]
    parts = dotted.replace(".", " . ").split()
    return sum(names[i : i + len(parts)] == parts for i in range(len(names)))


def test_allocate_slots_can_skip_caching_and_reads_num_computed_tokens_once() -> None:
    """A compacted request is allocated on its physical length by lowering
    request.num_computed_tokens around the call: that is safe only if the method reads it once,
    at the start; and its blocks must never enter the prefix cache (delay_cache_blocks)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    assert "delay_cache_blocks" in inspect.signature(KVCacheManager.allocate_slots).parameters
    assert code_reads(KVCacheManager.allocate_slots, "request.num_computed_tokens") == 1
    source = inspect.getsource(KVCacheManager.allocate_slots)
    assert re.search(r"num_local_computed_tokens = \(\s*request\.num_computed_tokens", source)


@pytest.fixture
def manager():  # noqa: ANN201 - vLLM's KVCacheManager
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=20, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=1024, scheduler_block_size=16, hash_block_size=16,
                          enable_caching=True)


def test_truncating_a_requests_blocks_frees_them_and_later_blocks_follow_the_prefix(manager) -> None:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    request = Request("r", list(range(100)), SamplingParams(max_tokens=10), None)
    free = manager.block_pool.get_num_free_blocks()
    assert manager.allocate_slots(request, 100, delay_cache_blocks=True) is not None
    owned = manager.coordinator.single_type_managers[0].req_to_blocks["r"]
    assert isinstance(owned, list) and len(owned) == 7  # ceil(100 / 16)
    assert manager.block_pool.get_num_free_blocks() == free - 7
    # Blocks allocated with delay_cache_blocks are the request's alone: writable in place.
    assert all(manager.block_pool.is_block_writable(b) and b.block_hash is None and b.ref_cnt == 1
               for b in owned)
    kept = [b.block_id for b in owned[:2]]
    tail = owned[2:]
    del owned[2:]
    manager.block_pool.free_blocks(reversed(tail))
    assert manager.block_pool.get_num_free_blocks() == free - 2
    request.num_computed_tokens = 32  # the physical length after compaction: 2 full blocks
    assert manager.allocate_slots(request, 1, delay_cache_blocks=True) is not None
    now = [b.block_id for b in manager.coordinator.single_type_managers[0].req_to_blocks["r"]]
    assert now[:2] == kept and len(now) == 3


def test_full_attention_never_skips_tokens() -> None:
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    assert FullAttentionManager.get_num_skipped_tokens(None, 10_000) == 0  # type: ignore[arg-type]


def test_a_scheduler_class_can_be_configured() -> None:
    from vllm.config import SchedulerConfig
    from vllm.v1.core.sched.scheduler import Scheduler

    class Custom(Scheduler):
        pass

    config = SchedulerConfig(max_model_len=1024, is_encoder_decoder=False, scheduler_cls=Custom)
    assert config.get_scheduler_cls() is Custom


def test_scheduler_output_carries_an_extra_attribute_to_workers() -> None:
    import dataclasses

    from vllm.v1.core.sched.output import SchedulerOutput

    assert dataclasses.is_dataclass(SchedulerOutput) and not hasattr(SchedulerOutput, "__slots__")
    output = SchedulerOutput.make_empty()
    output.adaptive_kv = {"r": (100, 32)}  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(output)).adaptive_kv == {"r": (100, 32)}


def test_cpu_runs_the_v1_runner_synchronously_with_an_opaque_attention_op() -> None:
    from vllm.platforms import cpu
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    assert cpu.CpuPlatform.opaque_attention_op()
    assert "scheduler_config.async_scheduling = False" in inspect.getsource(cpu.CpuPlatform.check_and_update_config)


def test_the_runner_builds_seq_lens_and_slot_mapping_where_the_design_patches_them() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    init = inspect.getsource(GPUModelRunner.__init__)
    for buffer in ("self.seq_lens = ", "self.optimistic_seq_lens_cpu = ", "self.positions = ",
                   "self.query_start_loc = "):
        assert buffer in init, buffer
    prepare = inspect.getsource(GPUModelRunner._prepare_inputs)
    assert "self.input_batch.block_table.compute_slot_mapping(" in prepare
    assert code_reads(GPUModelRunner._prepare_inputs, "self.input_batch.block_table.compute_slot_mapping") == 1


def test_block_table_rows_grow_from_num_blocks_per_row() -> None:
    """Truncating a request's row is lowering num_blocks_per_row: append_row writes from there."""
    from vllm.v1.worker.block_table import BlockTable

    table = BlockTable(block_size=16, max_num_reqs=2, max_num_blocks_per_req=8, max_num_batched_tokens=64,
                       pin_memory=False, device=torch.device("cpu"), cp_kv_cache_interleave_size=1)
    table.add_row([5, 6, 7], 0)
    table.num_blocks_per_row[0] = 1
    table.append_row([9], 0)
    assert table.block_table.np[0, :3].tolist() == [5, 9, 7] and table.num_blocks_per_row[0] == 2


def test_cpu_attention_layout_and_position_free_attention_in_their_own_process() -> None:
    """tests/contract/kv_compaction_probe_cases.py loads vLLM's C++ kernels: its own process."""
    assert_all_pass_in_own_process(PROBE, expected=14)
