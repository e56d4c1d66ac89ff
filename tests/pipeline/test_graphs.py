"""CUDA graphs of the denoiser passes: the cache logic on the CPU through a capturer that runs eagerly (keys, input
refresh, a failed capture dropped, out-of-memory reported), the CUDA capturer's device handling against a recording
stand-in of torch.cuda, and on a GPU: replay equals eager bit for bit, on a device that is not the current one too."""

import contextlib

import numpy as np
import pytest
import torch

from fastsd35 import FastSD35Error
from fastsd35.pipeline import graphs, runner
from fastsd35.pipeline.graphs import CUDAGraphPasses, graph_key
from fastsd35.pipeline.runner import Pipeline, TransformerPass
from fastsd35.tiny.family import TINY_MMDITX_CONFIG, tiny_components


class EagerCapturer:
    """A capturer for the CPU: "capturing" runs the pass once, "replaying" runs it again into the static output, so
    a replay sees exactly what is in the static input buffers. `fail` raises this error from the next capture."""

    def __init__(self):
        self.captures, self.fail = 0, None

    def capture(self, run):
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.captures += 1
        output = run()

        def replay():
            fresh = run()
            if isinstance(output, torch.Tensor):
                output.copy_(fresh)
            else:  # the staged passes' dict or tuple of tensors
                for old, new in zip(output.values() if isinstance(output, dict) else output,
                                    fresh.values() if isinstance(fresh, dict) else fresh):
                    old.copy_(new)

        return replay, output


def toy_pass(x, sigma, y, context, *, skip_layers=(), control=None):
    """A pass whose output depends on every input (and on the skip set and the control)."""
    v = x * sigma[:, None, None, None] + y.mean(1)[:, None, None, None] + context.mean((1, 2))[:, None, None, None]
    v = v + sum(skip_layers)
    if control is not None:
        v = v + control[0] * control[1]
    return v


def toy_inputs(batch=2, hw=(4, 6), n_ctx=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=randn(batch, 16, *hw), sigma=torch.rand(batch, generator=g), y=randn(batch, 8),
                context=randn(batch, n_ctx, 8))


def test_graph_key_separates_what_a_graph_cannot_serve():
    base = toy_inputs()
    key = graph_key(graphs.pass_inputs(**base), (3, 1))
    assert graph_key(graphs.pass_inputs(**toy_inputs(seed=1)), (1, 3)) == key  # other values, same skip set: same graph
    control = (torch.zeros(1, 16, 4, 6), torch.tensor(1.0))
    others = [
        graph_key(graphs.pass_inputs(**toy_inputs(batch=1)), (1, 3)),  # batch
        graph_key(graphs.pass_inputs(**toy_inputs(hw=(6, 4))), (1, 3)),  # latent size
        graph_key(graphs.pass_inputs(**toy_inputs(n_ctx=7)), (1, 3)),  # context length
        graph_key(graphs.pass_inputs(**toy_inputs(dtype=torch.bfloat16)), (1, 3)),  # dtype
        graph_key(graphs.pass_inputs(**base), (1,)),  # skip set
        graph_key(graphs.pass_inputs(**base), ()),
        graph_key(graphs.pass_inputs(**base, control=control), (1, 3)),  # ControlNet on
    ]
    assert len({key, *others}) == 1 + len(others)


def test_cache_captures_once_per_key_and_refreshes_inputs_every_call():
    capturer = EagerCapturer()
    passes = CUDAGraphPasses(toy_pass, "cpu", capturer=capturer)
    control = (torch.randn(1, 16, 4, 6), torch.tensor(0.5))
    passes_of_a_step = (((), None), ((2,), None), ((), control))  # plain, skip-layer, ControlNet
    calls = [(toy_inputs(seed=s), skip, ctl) for s in (0, 1, 2) for skip, ctl in passes_of_a_step]
    calls.append((toy_inputs(batch=1, hw=(8, 8), n_ctx=3, seed=4), (), None))
    for inputs, skip, ctl in calls:
        if ctl is not None:
            ctl = (ctl[0] + inputs["sigma"][0], ctl[1])  # a new control latent every call, too
        got = passes(**inputs, skip_layers=skip, control=ctl)
        torch.testing.assert_close(got, toy_pass(**inputs, skip_layers=skip, control=ctl), rtol=0, atol=0)
    assert capturer.captures == len(passes.graphs) == 4  # no skip, skip {2}, ControlNet, another shape
    out = passes(**calls[0][0])
    assert out is not passes(**calls[0][0])  # a copy: the next replay does not overwrite what the caller holds


def test_graphs_refuse_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device, not cpu: run the pass eagerly \(--no-graphs\)"):
        CUDAGraphPasses(lambda *a, **k: None, "cpu")
    # a CUDA device asked for where there is none: the same one line, not an error from inside torch.cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device, not cuda:0: run the pass eagerly"):
        CUDAGraphPasses(lambda *a, **k: None, "cuda:0")


def capture_invalidated_by_oom():
    """What an allocation failure inside `torch.cuda.graph` raises: the OOM, then the invalidated capture's error."""
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        return e


def test_out_of_memory_during_capture_is_the_friendly_error_and_nothing_is_cached(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pipe = Pipeline.from_preset("tiny_random", device="cpu")
    capturer = EagerCapturer()
    pipe.model_pass = CUDAGraphPasses(pipe.model_pass, "cpu", capturer=capturer)
    kw = dict(steps=1, width=64, height=64, progress=False)
    for error in (capture_invalidated_by_oom(), torch.cuda.OutOfMemoryError("CUDA out of memory")):
        capturer.fail = error
        with pytest.raises(FastSD35Error, match=r"^out of GPU memory while sampling: lower --batch-size or --width"):
            pipe("a red cube", **kw)
        assert pipe.model_pass.graphs == {}  # the half-captured graph is dropped: the next call captures again
    eager = Pipeline.from_preset("tiny_random", device="cpu")
    np.testing.assert_array_equal(np.asarray(pipe("a red cube", **kw)[0]), np.asarray(eager("a red cube", **kw)[0]))
    assert capturer.captures == len(pipe.model_pass.graphs) == 1


def test_other_capture_errors_are_not_called_out_of_memory():
    capturer = EagerCapturer()
    passes = CUDAGraphPasses(toy_pass, "cpu", capturer=capturer)
    capturer.fail = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="not permitted") as info:
        passes(**toy_inputs())
    assert not isinstance(info.value, torch.cuda.OutOfMemoryError) and passes.graphs == {}


class RecordingCuda:
    """Stands in for the parts of torch.cuda that CUDACapturer uses, recording the device of every stream, pool and
    synchronisation, and whether each happened while the model's device was the current one."""

    def __init__(self, monkeypatch, current=0):
        self.current, self.events = current, []
        cuda = self

        class Stream:
            def __init__(self, device=None):
                self.device = torch.device("cuda", cuda.current) if device is None else torch.device(device)
                cuda.events.append(("stream", self.device, cuda.current))

            def wait_stream(self, other):
                assert other.device == self.device, "a stream waits on another device's stream"

        class CUDAGraph:
            def replay(self):
                cuda.events.append(("replay", None, cuda.current))

            def reset(self):
                pass

        @contextlib.contextmanager
        def device(d):
            previous, cuda.current = cuda.current, torch.device(d).index
            try:
                yield
            finally:
                cuda.current = previous

        @contextlib.contextmanager
        def stream(s):
            cuda.events.append(("run on", s.device, cuda.current))
            yield

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None):
            s = stream or default_capture_stream
            cuda.events.append(("capture on", s.device, cuda.current))
            yield

        # torch.cuda.graph's default capture stream: made once per process, on the device current at first use
        default_capture_stream = Stream(torch.device("cuda", 0))
        self.events.clear()
        for name, value in dict(is_available=lambda: True, current_device=lambda: cuda.current, Stream=Stream,
                                current_stream=lambda d=None: Stream(d), stream=stream, device=device, graph=graph,
                                set_stream=lambda s: cuda.events.append(("set stream", s.device, cuda.current)),
                                CUDAGraph=CUDAGraph, graph_pool_handle=lambda: ("pool", cuda.current)).items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_capture_happens_on_the_models_device_not_the_current_one(monkeypatch):
    cuda = RecordingCuda(monkeypatch, current=0)
    capturer = graphs.CUDACapturer("cuda:1")
    assert capturer.pool == ("pool", 1)
    replay, _ = capturer.capture(lambda: torch.zeros(1))
    replay()
    assert [e for e in cuda.events if e[0] == "replay"] == [("replay", None, 1)]  # replayed once, with cuda:1 current
    assert cuda.events and all(device in (None, torch.device("cuda:1")) and current == 1
                               for _, device, current in cuda.events), cuda.events
    assert ("capture on", torch.device("cuda:1"), 1) in cuda.events and cuda.current == 0

    calls = []

    def oom_in_capture():  # the warm-up call succeeds, the captured one runs out of memory
        calls.append(1)
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    cuda.events.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        capturer.capture(oom_in_capture)
    assert cuda.events[-1] == ("set stream", torch.device("cuda:1"), 1)  # the caller's stream is current again


def test_stages_synchronise_the_models_device(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timings = {}
    with runner._stage("sample", timings, torch.device("cuda:1")):
        pass
    assert synced == [torch.device("cuda:1")] * 2 and "sample" in timings


@pytest.mark.parametrize("graphs, device, replayed", [(None, "cuda:0", True), (True, "cuda:1", True),
                                                     (False, "cuda:0", False), (None, "cpu", False), (False, "cpu", False)])
def test_graphs_are_on_by_default_on_cuda_only(graphs, device, replayed):
    assert runner.use_graphs(graphs, torch.device(device)) is replayed


def test_cpu_pipeline_runs_eagerly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pipe = Pipeline.from_preset("tiny_random", device="cpu")
    assert type(pipe.model_pass) is TransformerPass
    with pytest.raises(FastSD35Error, match="CUDA graphs need a CUDA device; the transformer is on cpu"):
        Pipeline.from_preset("tiny_random", device="cpu", graphs=True)


# -- GPU --------------------------------------------------------------------------------------------------------


def pass_inputs(batch, h, w, n_ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_MMDITX_CONFIG
    return dict(
        x=torch.randn(batch, 16, h, w, generator=g).cuda(),
        sigma=torch.full((batch,), 0.85791015625),  # the sampler hands over CPU sigmas
        y=torch.randn(batch, cfg.adm_in_channels, generator=g).cuda().bfloat16(),
        context=torch.randn(batch, n_ctx, cfg.context_dim, generator=g).cuda().bfloat16(),
    )


@pytest.mark.gpu
@torch.inference_mode()
def test_replay_equals_eager_for_every_pass_and_shape():
    transformer, _, _ = tiny_components(device="cuda", dtype=torch.bfloat16)
    eager = TransformerPass(transformer)
    graphed = CUDAGraphPasses(TransformerPass(transformer), "cuda")
    cases = [
        (pass_inputs(2, 32, 32, 154), ()),  # CFG pass [cond, uncond]
        (pass_inputs(1, 32, 32, 154), ()),  # cond only (cfg <= 1)
        (pass_inputs(1, 32, 32, 154), (0,)),  # skip-layer pass
        (pass_inputs(2, 24, 40, 333), ()),  # another latent size and context length
    ]
    for inputs, skip in cases:
        for seed in (0, 1):  # the second call replays with new inputs copied into the static buffers
            inputs = {k: v if k == "sigma" else v + seed for k, v in inputs.items()}
            expected = eager(**inputs, skip_layers=skip)
            got = graphed(**inputs, skip_layers=skip)
            assert torch.equal(got, expected), (inputs["x"].shape, skip, (got - expected).abs().max())
    assert len(graphed.graphs) == 4


@pytest.mark.gpu
def test_pipeline_with_graphs_gives_the_eager_images():
    kw = dict(steps=4, width=128, height=96, progress=False, batch_size=2)
    graphed = Pipeline.from_preset("tiny_random", device="cuda")
    eager = Pipeline.from_preset("tiny_random", device="cuda", graphs=False)
    assert isinstance(graphed.model_pass, CUDAGraphPasses) and type(eager.model_pass) is TransformerPass
    a = np.stack([np.asarray(im) for im in graphed("a red cube", **kw)])
    b = np.stack([np.asarray(im) for im in eager("a red cube", **kw)])
    np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@torch.inference_mode()
def test_replay_with_controlnet_inputs_equals_eager(tmp_path):
    """The control latent and strength are graph inputs: new values replay correctly, no stale capture."""
    from fastsd35.tiny.family import write_tiny_controlnet
    from fastsd35.weights.controlnet import load_controlnet

    controlnet = load_controlnet(write_tiny_controlnet(tmp_path / "cn.safetensors"), device="cuda", dtype=torch.bfloat16)
    transformer, _, _ = tiny_components(device="cuda", dtype=torch.bfloat16)
    eager = TransformerPass(transformer, controlnet)
    graphed = CUDAGraphPasses(TransformerPass(transformer, controlnet), "cuda")
    inputs = pass_inputs(2, 32, 32, 154)
    for seed, strength in ((0, 1.0), (1, 0.5)):
        latent = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
        control = (latent, torch.tensor(strength, device="cuda"))
        assert torch.equal(graphed(**inputs, control=control), eager(**inputs, control=control))
    assert len(graphed.graphs) == 1


@pytest.mark.gpu
@torch.inference_mode()
def test_graphs_and_eager_on_a_device_that_is_not_the_current_one():
    """The model on cuda:1 while cuda:0 is current: Triton launches, the capture (streams, pool) and the stage
    timing must all use cuda:1, and the current device is left alone."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices (the model on cuda:1, cuda:0 current); {torch.cuda.device_count()} here")
    torch.cuda.set_device(0)
    transformer, _, _ = tiny_components(device="cuda:1", dtype=torch.bfloat16)
    inputs = {k: v if k == "sigma" else v.to("cuda:1") for k, v in pass_inputs(2, 32, 32, 154).items()}
    eager = TransformerPass(transformer)(**inputs)
    graphed = CUDAGraphPasses(TransformerPass(transformer), "cuda:1")
    for _ in range(2):  # capture, then replay
        got = graphed(**inputs)
        assert got.device == torch.device("cuda:1") and torch.equal(got, eager)
    assert torch.cuda.current_device() == 0

    kw = dict(steps=2, width=128, height=96, progress=False)
    generation = Pipeline.from_preset("tiny_random", device="cuda:1").generate("a red cube", **kw)
    plain = Pipeline.from_preset("tiny_random", device="cuda:1", graphs=False)("a red cube", **kw)
    np.testing.assert_array_equal(np.asarray(generation.images[0]), np.asarray(plain[0]))
    assert set(generation.timings) == {"encode", "sample", "decode"} and torch.cuda.current_device() == 0


def test_static_copies_never_alias_the_callers_tensors():
    """A graph's input buffers are its own: the sampler reusing (or changing) its tensors after the capture must not
    change what a replay reads until refresh() copies the next call in."""
    from fastsd35.pipeline.graphs import refresh, static_copies

    x, sigma = torch.zeros(2, 3), torch.ones(2)
    static = static_copies({"x": x, "sigma": sigma}, "cpu")
    x += 5
    assert static["x"].abs().sum() == 0 and static["x"].data_ptr() != x.data_ptr()
    refresh(static, {"x": x, "sigma": sigma * 2})
    assert torch.equal(static["x"], x) and torch.equal(static["sigma"], sigma * 2)


@pytest.mark.parametrize("text", ["CUDA out of memory. Tried to allocate 2.00 GiB", "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"])
def test_out_of_memory_is_found_by_either_message_and_through_a_cyclic_chain(text):
    """Each of the two allocation-failure messages counts alone, also as the context of the error that reaches us;
    an exception chain that loops back on itself ends the search instead of hanging it."""
    from fastsd35.pipeline.graphs import is_out_of_memory

    cause = RuntimeError(text)
    outer = RuntimeError("Capture must end on the same stream it began on")
    outer.__context__ = cause
    assert is_out_of_memory(cause) and is_out_of_memory(outer)
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle with no out-of-memory in it
    assert not is_out_of_memory(a)
