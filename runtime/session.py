"""An onnxruntime session over a model folder, with the KV cache kept where the provider computes.

IO binding is used on every provider: on CUDA the inputs, outputs and cache stay on the device; on
the `ort` target past and present are bound to the same preallocated buffer, so a decode step
copies no cache at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runtime import options
from runtime.errors import ContextLengthError, ModelFolderError, ProviderError
from runtime.folder import ModelInfo, check_integrity, read_model_folder
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)
PROVIDERS = ("auto", "cpu", "cuda")


def cuda_refusal(info: ModelInfo) -> str | None:
    """Why the folder cannot run on onnxruntime's CUDA provider, or None. onnxruntime's CUDA
    GroupQueryAttention takes float16 and bfloat16 only: a float32 graph's attention falls back
    to the CPU provider, and decoding then departs from the CPU run (on an H200, onnxruntime-gpu
    1.31.1: prefill logits within 1.5e-4, decode steps 0.2 apart; a Q4_K_M folder's greedy
    tokens 4 of 384 the reference's). llamaonnx's own kernels (`custom_ops`) are CPU kernels:
    under the CUDA provider they would run on the CPU between copies, their attention on a cache
    kept on the device, the same arrangement that decodes wrong above."""
    if info.custom_ops:
        return (
            f"{info.folder} runs llamaonnx's CPU kernels ({', '.join(info.custom_ops)}), which "
            "onnxruntime's CUDA provider cannot run. Make a CUDA folder from its fp32 export with "
            "`llamaonnx quantize FOLDER OUT --precision int4 --for-provider cuda`, or run this "
            "one with --provider cpu"
        )
    if info.target == "ort" and info.kv_dtype == "float32":
        return (
            f"{info.folder} runs onnxruntime's GroupQueryAttention in float32, which its CUDA "
            "provider does not have: the attention would run on the CPU and decoding would give "
            "wrong tokens. Make a CUDA folder with `llamaonnx quantize FOLDER OUT --precision "
            "fp16|int4|int8 --for-provider cuda` (float16 activations and cache), or run this "
            "one with --provider cpu"
        )
    return None


def resolve_provider(provider: str, info: ModelInfo | None = None) -> str:
    """cpu or cuda for `provider` (cpu | cuda | auto). auto takes CUDA where onnxruntime has it
    and the folder (`info`) can run there."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {PROVIDERS}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise ProviderError(
            "provider 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu); use --provider cpu or auto"
        )
    refusal = cuda_refusal(info) if info is not None else None
    if provider == "cuda" and refusal:
        raise ProviderError(refusal)
    if provider == "auto":
        provider = "cuda" if has_cuda and not refusal else "cpu"
        if has_cuda and refusal:  # (DESIGN.md: a fall back to the CPU is said out loud)
            log.warning("provider auto → cpu, not CUDA: %s", refusal)
        else:
            log.info("provider auto → %s", provider)
    return provider


def kv_buffers(count: int, shape: tuple[int, ...], dtype) -> list[np.ndarray]:
    """`count` zeroed cache tensors of `shape`, as views of one block: numpy asks Linux for huge
    pages for a block of 4 MB or more, which a decode step, reading every layer's cache, then
    walks in few TLB entries rather than one per 4 KB (runtime/native/weights.c does the same for
    the weights)."""
    block = np.zeros((count, *shape), dtype)
    return list(block)


class KVCache:
    """Per-layer key/value tensors for a batch, allocated for `max_length` tokens.

    shared (the `ort` target): one (B, Hkv, max_length, Dh) buffer per tensor, bound as past and
    present. Otherwise: past (B, Hkv, P, Dh) grows as each step's present becomes the next past.
    """

    def __init__(self, info: ModelInfo, batch: int, max_length: int, device: str, shared: bool):
        import onnxruntime as ort

        self.batch, self.max_length, self.shared, self.device = batch, max_length, shared, device
        self.length = 0  # tokens (incl. padding columns) already in the cache
        self.binding = None  # the session's IO binding for this cache, made on the first step
        self.logits = None  # host buffer the logits are bound to (shared cache)
        self.static = None  # fixed decode buffers (Session static_decode / cuda_graph)
        self.graph_id = 0  # the CUDA graph its decode steps replay (cuda_graph); 0: none
        length = max_length if shared else 0
        shape = (batch, info.n_kv_heads, length, info.head_dim)
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(buffer, device, 0)
            for buffer in kv_buffers(2 * info.n_layers, shape, info.kv_dtype)
        ]

    def reset(self) -> KVCache:
        """Empty again, keeping its buffers and bindings (and so any CUDA graph over them)."""
        self.length = 0
        return self

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise ContextLengthError(
                f"{self.length} cached + {new_tokens} new tokens exceed the cache's max length "
                f"{self.max_length}; start a new cache or ask for a larger max_length"
            )


def register_custom_ops(opts, info: ModelInfo, library: str | Path | None = None) -> Path | None:
    """Loads the kernel libraries the folder's graph names (llamaonnx.json `custom_ops`):
    the installed one, or `library` (another build of it, for an A/B in one process). Returns
    the library's path, or None where the graph needs none."""
    from runtime import native

    path = None
    for domain in info.custom_ops:
        if domain != native.DOMAIN:
            raise ModelFolderError(
                f"{info.folder} needs custom ops of domain {domain!r}; this runtime has only "
                f"{native.DOMAIN!r}"
            )
        path = Path(library) if library else native.library_path()
        if not path.is_file():
            raise ModelFolderError(f"kernel library {path} does not exist")
        opts.register_custom_ops_library(str(path))
        if not native.fast_path():
            log.warning(
                "%s runs llamaonnx's kernels, and this CPU has neither AVX2 nor AVX-512 VNNI: "
                "their portable C path is correct but slow; for this CPU quantize with "
                "--kernel nbits",
                info.folder,
            )
    return path


def bucket(max_length: int, limit: int) -> int:
    """The cache length kept for static decode: the next power of two from 256, at most `limit`."""
    size = 256
    while size < max_length:
        size *= 2
    return min(size, limit)


class Session:
    """`static_decode`: decode steps run on fixed-shape buffers bound once — input ids (B, 1), the
    attention mask at the cache's full length (B, max_length; GroupQueryAttention reads the lengths
    from its row sums), logits (B, 1, V) on the device — which is what CUDA graphs need
    (`cuda_graph`, which implies it: decode is captured once and replayed; prefill runs outside
    the graph). Only for the `ort` target, whose KV buffer is shared.

    A captured graph replays the device addresses and shapes it was captured with, so in these
    modes the session keeps one cache per (batch, length bucket) — lengths round up to a power of
    two from 256 — and `new_cache` hands that same cache back, emptied. Each kept cache has its
    own CUDA graph. One generation at a time per session, then: a second `new_cache` of the same
    shape empties the first.

    `check_files`: compare every file with the sha256 recorded when the folder was written
    (llamaonnx.json `files`) before loading, so corrupt weights are an IntegrityError naming the
    file rather than silent garbage. It reads the whole folder once (README: "Integrity").
    `threads`: onnxruntime's intra-op threads, 1 to 4× the core count (None: its own choice).
    `profile`: a file prefix; onnxruntime's profiler records every run until
    `self.session.end_profiling()` writes its JSON (runtime/bench/profile.py reads it).
    `kernel_library`: another build of llamaonnx's kernel library in place of the installed one
    (runtime/bench/ab.py compares two in one process)."""

    def __init__(
        self,
        folder: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        static_decode: bool = False,
        cuda_graph: bool = False,
        check_files: bool = True,
        profile: str | None = None,
        kernel_library: str | Path | None = None,
    ):
        import onnxruntime as ort

        threads = options.threads(threads)
        self.info = read_model_folder(folder)
        if check_files:
            check_integrity(self.info)
        self.provider = resolve_provider(provider, self.info)
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        self.static_decode = static_decode or cuda_graph
        self.cuda_graph = cuda_graph
        if self.static_decode and not self.info.shared_kv_buffer:
            raise ProviderError(
                "static decode buffers and CUDA graphs need the `ort` target's shared KV buffer; "
                f"{self.info.folder} is {self.info.target}"
            )
        if cuda_graph and self.device != "cuda":
            raise ProviderError("CUDA graphs need provider 'cuda'")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # errors only: onnxruntime warns at every load that `logits_to_keep` (an initializer
        # that is also an input, so callers may override it) "will not be treated as constant"
        opts.log_severity_level = 3
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile
        library = register_custom_ops(opts, self.info, kernel_library)
        # The kernels' parallel loops run on the library's own threads (runtime/native/pool.c:
        # a decode step 1.05× on the AVX2 EPYC, docs/speed.md), onnxruntime's other ops on one;
        # elsewhere onnxruntime's threads run everything.
        self.kernel_threads = 1
        if library is not None and self.device == "cpu":
            from runtime import native

            self.kernel_threads = native.start_threads(library, threads)
        if self.kernel_threads > 1:
            opts.intra_op_num_threads = 1
        elif threads:
            opts.intra_op_num_threads = threads
        providers = (
            [
                ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}),
                "CPUExecutionProvider",
            ]
            if self.device == "cuda"
            else ["CPUExecutionProvider"]
        )
        try:
            self.session = ort.InferenceSession(
                str(self.info.folder / "model.onnx"), opts, providers=providers
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            said = str(e).partition("llamaonnx kernels: ")[2]
            if "tile layout" in said:  # (runtime/native/tiles.h, TILE_LAYOUT)
                raise ModelFolderError(f"{self.info.folder}: {said}") from e
            raise ModelFolderError(
                f"onnxruntime cannot load {self.info.folder / 'model.onnx'}: it is truncated, "
                f"corrupt or not a model this onnxruntime runs ({type(e).__name__}: "
                f"{str(e)[:300]})"
            ) from e
        self._check_io()
        # No RunOptions unless they carry something: onnxruntime's Python wrapper looks up
        # gpu_graph_id in them on every run, and a missing key costs a raised exception (~80 µs).
        self._prefill_options = None
        if cuda_graph:  # -1: prefill is never captured; each kept cache's decode has its own id
            self._prefill_options = ort.RunOptions()
            self._prefill_options.add_run_config_entry("gpu_graph_id", "-1")
        self.tokenizer = Tokenizer.from_folder(self.info.folder)
        self.input_names = {i.name for i in self.session.get_inputs()}
        # `logits_to_keep` (export/passes/logits.py): the LM head on the last positions only;
        # folders exported before it compute every position's logits
        optional = {i.name for i in self.session.get_overridable_initializers()}
        self.keeps_logits = "logits_to_keep" in optional
        self.logits_to_keep = {
            n: ort.OrtValue.ortvalue_from_numpy(np.array([n], np.int64), self.device, 0)
            for n in (0, 1)
        }
        self._kept: dict[tuple[int, int], KVCache] = {}  # static decode: (batch, length) → cache

    def _check_io(self) -> None:
        """The graph's cache inputs agree with llamaonnx.json's layer count."""
        past = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if len(past) != 2 * self.info.n_layers:
            raise ModelFolderError(
                f"{self.info.folder}: llamaonnx.json says {self.info.n_layers} layers, but the "
                f"graph has {len(past)} past key/value inputs ({len(past) // 2} layers); the "
                "folder's files do not belong together. Export it again"
            )

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        if max_length > self.info.max_position:
            raise ContextLengthError(
                f"max_length {max_length} exceeds the model's context of "
                f"{self.info.max_position} tokens"
            )
        if not self.static_decode:
            return KVCache(self.info, batch, max_length, self.device, self.info.shared_kv_buffer)
        key = (batch, bucket(max_length, self.info.max_position))
        if key in self._kept:
            return self._kept[key].reset()
        cache = KVCache(self.info, batch, key[1], self.device, shared=True)
        cache.graph_id = len(self._kept) + 1
        self._kept[key] = cache
        return cache

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        copy: bool = True,
        last: bool = False,
    ) -> np.ndarray:
        """One step: (B, S) new tokens, (B, T) mask over cache + new → logits (B, S, V) on the
        host. `copy` False: a decode step's logits may come back as a view of the cache's
        output buffer, valid until its next step (the generator reads them before; it saves
        copying 200 kB a token). `last`: only the last position's logits are wanted; where the
        graph can (`keeps_logits`) it computes only those and returns (B, 1, V)."""
        import onnxruntime as ort

        s = input_ids.shape[1]
        cache.check_room(s)
        if attention_mask.shape[1] != cache.length + s:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns, expected {cache.length + s}"
            )
        if self.static_decode and s == 1 and cache.length > 0:
            return self._static_step(input_ids, attention_mask, cache, copy)
        binding = cache.binding
        if binding is None:  # first step of this cache: bind what stays bound
            binding = cache.binding = self.session.io_binding()
            if cache.shared:
                self._bind_shared_kv(binding, cache)
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        for name, arr in feeds.items():
            if name in self.input_names:
                binding.bind_ortvalue_input(
                    name,
                    ort.OrtValue.ortvalue_from_numpy(
                        np.ascontiguousarray(arr, np.int64), self.device, 0
                    ),
                )
        last = last and self.keeps_logits and s > 1
        if self.keeps_logits:
            binding.bind_ortvalue_input("logits_to_keep", self.logits_to_keep[int(last)])
        if cache.shared:
            # logits land in a host array: for decode steps one (B, 1, V) array bound once and
            # copied out; a prefill's (B, S, V) array (25 MB for 130 tokens) is new and handed
            # over as it is, not copied
            shape = (input_ids.shape[0], 1 if last else s, self.info.vocab_size)
            if cache.logits is None or cache.logits.shape != shape or s > 1:
                cache.logits = np.empty(shape, np.float32)
                binding.bind_ortvalue_output(
                    "logits", ort.OrtValue.ortvalue_from_numpy(cache.logits, "cpu", 0)
                )
            self.session.run_with_iobinding(binding, self._prefill_options)
            cache.length += s
            if s > 1:
                logits, cache.logits = cache.logits, None
                return logits
            return cache.logits.copy() if copy else cache.logits
        # past → present: this step's outputs are the next step's inputs. Outputs come back in
        # first-bound order: logits, then present.{i}.key/value.
        binding.bind_output("logits", "cpu")
        for i in range(self.info.n_layers):
            for j, kv in enumerate(("key", "value")):
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", cache.values[2 * i + j])
                binding.bind_output(f"present.{i}.{kv}", self.device)
        self.session.run_with_iobinding(binding, self._prefill_options)
        outputs = binding.get_outputs()
        cache.values = list(outputs[1:])
        cache.length += s
        return outputs[0].numpy()

    def decode_steps(self, cache: KVCache, mask: np.ndarray) -> DecodeSteps | None:
        """Decode steps on `cache` with every input bound once, after its prompt (`mask`, its
        (B, T) attention mask so far), where the cache is a shared buffer on the host (the `ort`
        target on the CPU provider, without static_decode's own buffers); else None, and
        `forward` it is."""
        if not cache.shared or self.device != "cpu" or self.static_decode:
            return None
        return DecodeSteps(self, cache, mask)

    def _bind_shared_kv(self, binding, cache: KVCache) -> None:
        """Past and present are one buffer: bound once per cache, never copied."""
        for i in range(self.info.n_layers):
            for j, kv in enumerate(("key", "value")):
                value = cache.values[2 * i + j]
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", value)
                binding.bind_ortvalue_output(f"present.{i}.{kv}", value)

    def _static_step(self, input_ids, attention_mask, cache: KVCache, copy: bool) -> np.ndarray:
        """A decode step on the cache's fixed buffers: only their contents change."""
        import onnxruntime as ort

        b, info = input_ids.shape[0], self.info
        if cache.static is None:
            binding = self.session.io_binding()
            ids = ort.OrtValue.ortvalue_from_shape_and_type((b, 1), np.int64, self.device, 0)
            mask = ort.OrtValue.ortvalue_from_shape_and_type(
                (b, cache.max_length), np.int64, self.device, 0
            )
            logits = ort.OrtValue.ortvalue_from_shape_and_type(
                (b, 1, info.vocab_size), np.float32, self.device, 0
            )
            binding.bind_ortvalue_input("input_ids", ids)
            binding.bind_ortvalue_input("attention_mask", mask)
            binding.bind_ortvalue_output("logits", logits)
            self._bind_shared_kv(binding, cache)
            options = None
            if self.cuda_graph:
                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(cache.graph_id))
            host_mask = np.zeros((b, cache.max_length), np.int64)
            cache.static = (binding, ids, mask, logits, host_mask, options)
        binding, ids, mask, logits, host_mask, options = cache.static
        t = attention_mask.shape[1]
        host_mask[:, :t] = attention_mask
        host_mask[:, t:] = 0
        ids.update_inplace(np.ascontiguousarray(input_ids, np.int64))
        mask.update_inplace(host_mask)
        self.session.run_with_iobinding(binding, options)
        cache.length += 1
        out = logits.numpy()  # from the device: already a host copy
        return out if self.device == "cuda" or not copy else out.copy()  # CPU: a view, reused


class DecodeSteps:
    """One token a row a step on a shared host cache, with every input bound once and written in
    place, the way static_decode binds them for CUDA graphs: the token ids (B, 1), the attention
    mask at the cache's full length (B, max_length; GroupQueryAttention takes each row's length
    from its row sum, so the columns past it stay 0), position ids where the graph reads them, and
    the logits (B, 1, V). The caller writes the step's tokens into `ids` (and `positions`) and
    each running row's new mask column, then `run()`.

    Why: after a step streams the weights through the caches, each Python-level operation
    between two steps costs 5–45 µs, not the 1–3 µs it costs warm (a new OrtValue for the mask
    and each input, their bindings, the checks of `forward`): ~180 µs a step outside onnxruntime,
    3–4 % of a 2-core CPU's decode step; docs/speed.md has the measurement."""

    def __init__(self, session: Session, cache: KVCache, mask: np.ndarray):
        import onnxruntime as ort

        b, width = mask.shape
        self.cache = cache
        self.ids = np.zeros((b, 1), np.int64)
        self.mask = np.zeros((b, cache.max_length), np.int64)
        self.mask[:, :width] = mask
        self.positions = (
            np.zeros((b, 1), np.int64) if "position_ids" in session.input_names else None
        )
        self.logits = np.empty((b, 1, session.info.vocab_size), np.float32)
        binding = session.session.io_binding()
        session._bind_shared_kv(binding, cache)
        host = ort.OrtValue.ortvalue_from_numpy  # on the host: a view of the array, not a copy
        binding.bind_ortvalue_input("input_ids", host(self.ids))
        binding.bind_ortvalue_input("attention_mask", host(self.mask))
        if self.positions is not None:
            binding.bind_ortvalue_input("position_ids", host(self.positions))
        if session.keeps_logits:
            binding.bind_ortvalue_input("logits_to_keep", session.logits_to_keep[0])
        binding.bind_ortvalue_output("logits", host(self.logits))
        self._binding, self._run = binding, session.session.run_with_iobinding

    def run(self) -> np.ndarray:
        """The step → logits (B, 1, V), a view the next step overwrites."""
        cache = self.cache
        if cache.length >= cache.max_length:
            cache.check_room(1)  # raises
        self._run(self._binding)
        cache.length += 1
        return self.logits
