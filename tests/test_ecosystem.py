"""torch_convt inside the rest of PyTorch: torch.compile with dynamic shapes (no graph breaks, no recompiles),
torch.export and torch.jit.trace, DistributedDataParallel (gloo, two processes), torch.func transforms and
forward-mode AD, weight/spectral-norm parametrizations, serialization, and deterministic mode. The reference is
always the same thing done with torch.nn / torch.nn.functional."""
import copy
import io
import os
import pickle
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_convt
import torch_convt.functional as TF
from helpers import assert_close, fn_pair, randn

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


def _tree_assert_close(actual, expected, **kw):
    actual, expected = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, what=f"leaf {i}", **kw)


_TORCH_NN_CLASS = {getattr(torch_convt, name): getattr(torch.nn, name) for name in torch_convt.modules.__all__}


def _reference_copy(model):
    """The same model computed by torch.nn: a deep copy whose torch_convt modules are turned back into their
    torch.nn base classes (same parameter values, buffers and hooks)."""
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if type(m) in _TORCH_NN_CLASS:
            m.__class__ = _TORCH_NN_CLASS[type(m)]
    return reference


def _grads(model, inputs, outputs):
    """d(sum of squares of outputs) / d(inputs and parameters)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum(o.square().sum() for o in outputs)
    return torch.autograd.grad(loss, list(inputs) + list(model.parameters()))


# ----------------------------------------------------------------------------------------------------------
# 1. torch.compile(fullgraph=True, dynamic=True): one graph for every batch and spatial size
# ----------------------------------------------------------------------------------------------------------
class _AllDims(torch.nn.Module):
    """A 3D down/up block in the U-Net style (the up-sampler's output_size is the input's size, so its
    output_padding depends on the parity of the input size), plus 2D and 1D transposed convolutions."""

    def __init__(self):
        super().__init__()
        self.down3d = torch_convt.Conv3d(3, 5, 3, stride=2, padding=1)
        self.up3d = torch_convt.ConvTranspose3d(5, 3, 3, stride=2, padding=1)
        self.up2d = torch_convt.ConvTranspose2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0))
        self.conv2d = torch_convt.Conv2d(2, 3, 3, padding=1)
        self.up1d = torch_convt.ConvTranspose1d(3, 2, 4, stride=3, dilation=2)

    def forward(self, x3, x2, x1):
        y3 = self.up3d(torch.relu(self.down3d(x3)), output_size=x3.shape[2:]) + x3
        y2 = self.conv2d(torch.tanh(self.up2d(x2)))
        return y3, y2, self.up1d(x1)


# (batch, 3D spatial, 2D spatial, 1D length): batch and every spatial size change, odd and even. The first
# call's sizes are all distinct (and differ from the channel counts) so that no two dims share a symbol.
_DYNAMIC_SIZES = [(2, (7, 8, 9), (10, 11), 12), (3, (8, 11, 6), (7, 9), 13), (5, (9, 6, 7), (12, 8), 6)]


def _all_dims_inputs(batch, s3, s2, s1, dtype, device="cpu"):
    return tuple(randn(shape, dtype, device, requires_grad=True)
                 for shape in ((batch, 3) + s3, (batch, 3) + s2, (batch, 3, s1)))


def _check_compiled_against_torch_nn(backend, dtype, sizes, device="cpu", **tol):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _AllDims().to(device, dtype)
    reference = _reference_copy(model)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises, naming the guard
            for batch, s3, s2, s1 in sizes:
                inputs = _all_dims_inputs(batch, s3, s2, s1, dtype, device)
                ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
                out, expected = compiled(*inputs), reference(*ref_inputs)
                _tree_assert_close(out, expected, **tol)
                _tree_assert_close(_grads(model, inputs, out), _grads(reference, ref_inputs, expected), **tol)
        assert counter.frame_count == 1, f"compiled {counter.frame_count} graphs, expected 1"
    finally:
        torch._dynamo.reset()


def test_compile_dynamic_shapes_one_graph_aot_eager(device):
    """Forward and backward through aot_eager (the fake kernels, autograd and SymInt arguments, traced once)
    for three different batch/spatial sizes: no graph break, no recompile, torch.nn's numbers."""
    _check_compiled_against_torch_nn("aot_eager", torch.float64, _DYNAMIC_SIZES, device)


@pytest.mark.slow  # (inductor compiles C++ for the forward and the backward graph: about 30 s on 2 cores)
def test_compile_dynamic_shapes_one_graph_inductor():
    _check_compiled_against_torch_nn("inductor", torch.float32, _DYNAMIC_SIZES[:2], rtol=1e-4, atol=1e-4)


def test_compile_dynamic_sizes_passed_as_op_arguments():
    """Sizes computed from symbolic shapes and passed to the ops (an output_padding from an input's size, a
    weight_size) stay symbolic: one graph for all sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(x, g, w, conv_transpose2d, conv2d_weight):
        big = conv_transpose2d(g, w, stride=2, output_padding=[x.shape[2] - 2 * g.shape[2], 0])
        return conv2d_weight(x, list(w.shape), g), big

    def ours(x, g, w):
        return f(x, g, w, TF.conv_transpose2d,
                 lambda x, size, g: torch.ops.torch_convt.conv_weight_grad(x, g, size, [2, 2], [0, 0], [1, 1], 1))

    def reference(x, g, w):
        return f(x, g, w, F.conv_transpose2d, lambda x, size, g: torch.nn.grad.conv2d_weight(x, size, g, stride=2))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter, fullgraph=True, dynamic=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for h, w_ in ((11, 13), (10, 9), (13, 8)):  # (first call: no two dims of the same size)
                x = randn((2, 3, h, w_))
                g = randn((2, 4, (h - 2) // 2 + 1, (w_ - 2) // 2 + 1))
                w = randn((4, 3, 2, 2))
                _tree_assert_close(compiled(x, g, w), reference(x, g, w))
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# 2. torch.export and torch.jit.trace
# ----------------------------------------------------------------------------------------------------------
class _UNetBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down = torch_convt.Conv3d(2, 4, 3, stride=2, padding=1)
        self.up = torch_convt.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.up(torch.relu(self.down(x))) + x


def test_export_runs_and_matches_with_dynamic_batch_and_saves():
    model = _UNetBlock().double()
    reference = _reference_copy(model)
    x = randn((3, 2, 4, 6, 8))
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.torch_convt.conv_transpose.default in targets
    assert torch.ops.torch_convt.conv.default in targets
    for n in (3, 5, 1):
        x = randn((n, 2, 4, 6, 8))
        assert_close(exported.module()(x), reference(x))

    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x = randn((2, 2, 4, 6, 8))
    assert_close(loaded.module()(x), reference(x))


def test_export_dynamic_spatial_sizes():
    model = _AllDims().double()
    reference = _reference_copy(model)
    dims = {0: torch.export.Dim("batch", min=2, max=64)}
    spatial = torch.export.Dim.AUTO
    dynamic_shapes = {"x3": {**dims, 2: spatial, 3: spatial, 4: spatial}, "x2": {**dims, 2: spatial, 3: spatial},
                      "x1": {**dims, 2: spatial}}
    batch, s3, s2, s1 = _DYNAMIC_SIZES[0]
    exported = torch.export.export(model, _all_dims_inputs(batch, s3, s2, s1, torch.float64),
                                   dynamic_shapes=dynamic_shapes)
    for batch, s3, s2, s1 in _DYNAMIC_SIZES[1:]:
        inputs = [t.detach() for t in _all_dims_inputs(batch, s3, s2, s1, torch.float64)]
        _tree_assert_close(exported.module()(*inputs), reference(*inputs))


# The functional layer checks the weight's channel count in Python, which the tracer flags; the weight's shape
# is fixed in a traced model, so the trace stays valid.
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning")
def test_jit_trace_runs_matches_and_saves():
    model = _UNetBlock().double()
    reference = _reference_copy(model)
    traced = torch.jit.trace(model, (randn((2, 2, 4, 6, 8)),))
    x = randn((3, 2, 4, 6, 8))
    assert_close(traced(x), reference(x))
    assert "torch_convt::conv_transpose" in str(traced.inlined_graph)

    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert_close(loaded(x), reference(x))


# ----------------------------------------------------------------------------------------------------------
# memory format: channels_last in, the same memory format out as torch.nn, and the input is never copied
# ----------------------------------------------------------------------------------------------------------
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_COPY_OPS = {"aten::contiguous", "aten::clone", "aten::copy_", "aten::to", "aten::_to_copy"}


def _memory_format(t):
    fmt = _CHANNELS_LAST[t.dim() - 2]
    return "channels_last" if t.is_contiguous(memory_format=fmt) and not t.is_contiguous() else (
        "contiguous" if t.is_contiguous() else "other")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("which", ["input", "weight", "both"])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("batch", [2, 1])
def test_channels_last_output_format_matches_torch(dtype, dims, which, transposed, batch):
    """2d: channels_last out on every torch backend. 3d: only where torch takes oneDNN (float32 past some sizes:
    batch 2 here, not one image of 7x7 planes; bfloat16 where the CPU has oneDNN's bfloat16; never float64), so the
    same format as torch.nn, and the same strides under FakeTensorMode (torch.compile) as in the real call."""
    fmt = _CHANNELS_LAST[dims]
    x = randn((batch, 6) + (7,) * dims, dtype=dtype)
    w = randn(((6, 4) if transposed else (4, 6)) + (3,) * dims, dtype=dtype)
    if which in ("input", "both"):
        x = x.contiguous(memory_format=fmt)
    if which in ("weight", "both"):
        w = w.contiguous(memory_format=fmt)
    ours, ref = fn_pair("ct" if transposed else "conv", dims)
    kwargs = dict(stride=2, padding=1)
    if transposed:
        kwargs["output_padding"] = 1
    out, expected = ours(x, w, **kwargs), ref(x, w, **kwargs)
    assert _memory_format(out) == _memory_format(expected)
    if dims == 2 or (dtype == torch.float32 and batch == 2):
        assert _memory_format(out) == "channels_last"
    if dtype == torch.float64 and dims == 3:
        assert _memory_format(out) == "contiguous"
    assert_close(out, expected)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = ours(mode.from_tensor(x), mode.from_tensor(w), **kwargs)
    assert fake.stride() == out.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("batch", [2, 1])
def test_channels_last_3d_gradient_format_matches_torch(dtype, transposed, batch):
    """3d modules on a channels_last_3d input: the output and the input's gradient in the memory formats torch.nn
    gives them (its backend's choice, which depends on the dtype, the CPU and the layer's size)."""
    fmt = torch.channels_last_3d
    x = randn((batch, 6, 7, 7, 7), dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    if transposed:
        ref = torch.nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1).to(dtype)
        ours = torch_convt.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1).to(dtype)
    else:
        ref = torch.nn.Conv3d(6, 4, 3, stride=2, padding=1).to(dtype)
        ours = torch_convt.Conv3d(6, 4, 3, stride=2, padding=1).to(dtype)
    ours.load_state_dict(ref.state_dict())
    y_ref, y = ref(x), ours(x)
    g = torch.randn_like(y_ref)
    (gx_ref,), (gx,) = torch.autograd.grad(y_ref, x, g), torch.autograd.grad(y, x, g)
    assert _memory_format(y) == _memory_format(y_ref)
    assert _memory_format(gx) == _memory_format(gx_ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_is_read_in_place(dims):
    """Forward, input gradient and weight gradient read a channels_last input (and grad_output) through its
    strides: no copy of it appears among the operators the call runs."""
    fmt = _CHANNELS_LAST[dims]
    x = randn((2, 8) + (6,) * dims, dtype=torch.float32).contiguous(memory_format=fmt).requires_grad_()
    w = randn((8, 4) + (3,) * dims, dtype=torch.float32)
    up = getattr(torch_convt, f"ConvTranspose{dims}d")(8, 4, 3, stride=2, padding=1, output_padding=1)
    with torch.no_grad():
        up.weight.copy_(w)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = up(x)
        y.backward(torch.ones_like(y))
    names = {e.name for e in prof.events()}
    assert not names & _COPY_OPS, f"copies in a channels_last call: {sorted(names & _COPY_OPS)}"
    assert _memory_format(y) == "channels_last"
    ref = getattr(torch.nn, f"ConvTranspose{dims}d")(8, 4, 3, stride=2, padding=1, output_padding=1)
    ref.load_state_dict(up.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(torch.ones_like(y_ref))
    assert_close(y, y_ref)
    assert_close(x.grad, x_ref.grad)
    assert_close(up.weight.grad, ref.weight.grad)


# ----------------------------------------------------------------------------------------------------------
# 3. DistributedDataParallel (gloo, 2 processes on 127.0.0.1) == one process on the same global batch
# ----------------------------------------------------------------------------------------------------------
_DDP_TIMEOUT_S = 120  # for all ranks together; each also gives up on its peer after 30 s (ddp_worker.py)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp_workers(world_size, out_files):
    """Runs the ranks of ddp_worker.py as subprocesses; returns their exit codes and output. Never hangs: a
    rank still running at the deadline is killed."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               # the workers import the very torch_convt package this test imported
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(torch_convt.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs connect over loopback
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(rank), str(world_size),
                               str(port), str(out_files[rank])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world_size)]
    deadline = time.monotonic() + _DDP_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[0] + f"\n[killed after {_DDP_TIMEOUT_S} s]")
    finally:
        for p in procs:  # never leave a rank behind, waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], logs


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    """DDP over two processes, each on half the global batch, ends at the same parameters as one process on
    the whole batch (float64: DDP's gradient averaging and the single-process gradient agree to rounding)."""
    import ddp_worker

    world_size = 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world_size)]
    for _ in range(3):  # another process may take the free port between our probe and the workers' bind
        codes, logs = _run_ddp_workers(world_size, outs)
        if not any(c != 0 and "address already in use" in log.lower() for c, log in zip(codes, logs)):
            break
    for r, (code, log) in enumerate(zip(codes, logs)):
        assert code == 0, f"rank {r} exited with {code}:\n{log[-3000:]}"

    model = ddp_worker.build_model()
    initial = copy.deepcopy(model.state_dict())
    ddp_worker.train(model, *ddp_worker.global_batch())
    expected = model.state_dict()
    for r in range(world_size):
        got = torch.load(outs[r], weights_only=True)
        assert got.keys() == expected.keys()
        for name in expected:
            assert not torch.equal(expected[name], initial[name]), f"{name} did not train"
            assert_close(got[name], expected[name], what=f"rank {r} {name}")


# ----------------------------------------------------------------------------------------------------------
# 4. torch.func transforms and forward-mode AD
# ----------------------------------------------------------------------------------------------------------
# (kind, nd, input shape, weight shape, kwargs) -- tiny float64 problems; weight [C_small, C_big/groups, *k]
_FUNC_CASES = [
    ("ct", 1, (2, 2, 4), (2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ("ct", 2, (2, 2, 3, 3), (2, 2, 2, 3), dict(stride=(2, 1), padding=(0, 1), groups=2, dilation=(1, 2))),
    ("ct", 3, (1, 2, 2, 3, 2), (2, 2, 2, 2, 2), dict(stride=2, output_padding=(1, 0, 1))),
    ("conv", 1, (2, 3, 7), (2, 3, 3), dict(stride=2, padding=1)),
    ("conv", 2, (2, 2, 5, 6), (4, 1, 2, 3), dict(stride=(2, 1), groups=2, dilation=(1, 2))),
    ("conv", 3, (1, 2, 4, 3, 4), (2, 2, 2, 2, 2), dict(stride=2, padding=(1, 0, 1))),
]
_FUNC_IDS = [f"{kind}{nd}d" for kind, nd, *_ in _FUNC_CASES]


def _func_pair(kind, nd, x_shape, w_shape, kwargs, device):
    """(ours(x, w, b), torch's(x, w, b), (x, w, b)) for one case."""
    ours, ref = fn_pair(kind, nd)
    cout = w_shape[1] * kwargs.get("groups", 1) if kind == "ct" else w_shape[0]
    args = (randn(x_shape, device=device), randn(w_shape, device=device), randn((cout,), device=device))
    return (lambda x, w, b: ours(x, w, b, **kwargs)), (lambda x, w, b: ref(x, w, b, **kwargs)), args


_TRANSFORMS = {
    "grad": lambda f, args: torch.func.grad(lambda *a: f(*a).sin().sum(), argnums=(0, 1, 2))(*args),
    "vjp": lambda f, args: torch.func.vjp(f, *args)[1](torch.cos(f(*args))),
    "jacrev": lambda f, args: torch.func.jacrev(f, argnums=(0, 1, 2))(*args),
    "jvp": lambda f, args: torch.func.jvp(f, args, tuple(torch.cos(a) for a in args)),
    "jacfwd": lambda f, args: torch.func.jacfwd(f, argnums=(0, 1, 2))(*args),
    "jvp_weight_only": lambda f, args: torch.func.jvp(lambda w: f(args[0], w, args[2]), (args[1],),
                                                      (torch.cos(args[1]),)),
    "jvp_bias_only": lambda f, args: torch.func.jvp(lambda b: f(args[0], args[1], b), (args[2],),
                                                    (torch.cos(args[2]),)),
    "hessian_weight": lambda f, args: torch.func.hessian(lambda w: f(args[0], w, args[2]).tanh().sum())(args[1]),
    "grad_of_grad": lambda f, args: torch.func.grad(
        lambda x: torch.func.grad(lambda w: f(x, w, args[2]).tanh().sum())(args[1]).square().sum())(args[0]),
    "grad_of_jvp": lambda f, args: torch.func.grad(
        lambda w: torch.func.jvp(lambda x: f(x, w, args[2]), (args[0],), (torch.cos(args[0]),))[1].tanh().sum()
    )(args[1]),
}


@pytest.mark.parametrize("transform", list(_TRANSFORMS))
@pytest.mark.parametrize("kind,nd,x_shape,w_shape,kwargs", _FUNC_CASES, ids=_FUNC_IDS)
def test_torch_func_transforms_match_torch(kind, nd, x_shape, w_shape, kwargs, transform, device):
    ours, ref, args = _func_pair(kind, nd, x_shape, w_shape, kwargs, device)
    _tree_assert_close(_TRANSFORMS[transform](ours, args), _TRANSFORMS[transform](ref, args))


@pytest.mark.parametrize("kind,nd,x_shape,w_shape,kwargs", _FUNC_CASES, ids=_FUNC_IDS)
def test_vmap_matches_torch(kind, nd, x_shape, w_shape, kwargs, device):
    ours, ref, (x, w, b) = _func_pair(kind, nd, x_shape, w_shape, kwargs, device)
    xs, ws, bs = (randn((3,) + t.shape, device=device) for t in (x, w, b))
    for in_dims, args in [((0, None, None), (xs, w, b)),  # a batch of inputs: folded into the batch dim
                          ((None, 0, 0), (x, ws, bs)),  # a batch of weights (model ensembling)
                          ((1, 0, None), (xs.movedim(0, 1), ws, b))]:  # both, the input's vmapped dim not first
        assert_close(torch.func.vmap(ours, in_dims)(*args), torch.func.vmap(ref, in_dims)(*args))


def test_vmap_conv_weight_grad_batched_input_only():
    """conv_weight_grad sums over the batch dim, pairing its two tensors sample by sample: a vmapped input with
    an unbatched grad_output must not be folded into the batch dim."""
    op = torch.ops.torch_convt.conv_weight_grad
    xs, g = randn((3, 2, 2, 5, 5)), randn((2, 4, 2, 2))
    got = torch.func.vmap(lambda x: op(x, g, [4, 2, 3, 3], [2, 2], [0, 0], [1, 1], 1))(xs)
    for i in range(3):
        expected = torch.nn.grad.conv2d_weight(xs[i], [4, 2, 3, 3], g, stride=2)
        assert_close(got[i], expected)


def test_per_sample_gradients_with_functional_call():
    """The torch.func recipe for per-sample gradients: vmap(grad(functional_call(model, params, x)))."""
    model = torch.nn.Sequential(torch_convt.ConvTranspose2d(2, 3, 3, stride=2), torch.nn.Tanh(),
                                torch_convt.Conv2d(3, 1, 2)).double()
    reference = _reference_copy(model)
    x, target = randn((4, 2, 3, 3)), randn((4, 1, 6, 6))

    def per_sample(module):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, xi, ti):
            return F.mse_loss(torch.func.functional_call(module, p, (xi[None],)), ti[None])
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)

    got, expected = per_sample(model), per_sample(reference)
    assert got.keys() == expected.keys()
    for k in got:
        assert_close(got[k], expected[k], what=k)


@pytest.mark.parametrize("kind,nd,x_shape,w_shape,kwargs", _FUNC_CASES, ids=_FUNC_IDS)
def test_forward_ad_dual_numbers_match_torch(kind, nd, x_shape, w_shape, kwargs, device):
    ours, ref, args = _func_pair(kind, nd, x_shape, w_shape, kwargs, device)
    tangents = [randn(a.shape, device=device) for a in args]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        got, expected = fwAD.unpack_dual(ours(*duals)), fwAD.unpack_dual(ref(*duals))
    assert_close(got.primal, expected.primal)
    assert got.tangent is not None, "the tangent was dropped"
    assert_close(got.tangent, expected.tangent)


def test_forward_ad_under_no_grad():
    """Forward-mode AD does not depend on grad mode (as for torch's own ops)."""
    x, w, t = randn((1, 2, 3, 3)), randn((2, 2, 2, 2)), randn((1, 2, 3, 3))
    with torch.no_grad(), fwAD.dual_level():
        got = fwAD.unpack_dual(TF.conv_transpose2d(fwAD.make_dual(x, t), w, stride=2)).tangent
    assert_close(got, F.conv_transpose2d(t, w, stride=2))


_OP_CASES = {  # raw op -> (shapes of the tensor arguments, geometry arguments)
    "conv_transpose": (((1, 2, 3, 2), (2, 2, 2, 3), (2,)), ([2, 1], [1, 0], [1, 0], [1, 2], 1)),
    "conv": (((1, 2, 5, 4), (2, 2, 2, 2), (2,)), ([2, 1], [1, 0], [1, 2], 1)),
    "conv_weight_grad": (((2, 1, 4, 3), (2, 3, 3, 1)), ([3, 1, 2, 2], [2, 1], [1, 0], [1, 2], 1)),
}


@pytest.mark.parametrize("name", list(_OP_CASES))
def test_gradcheck_forward_mode_and_batched(name):
    """gradcheck with forward-mode AD and the vmap-based batched checks; gradgradcheck forward-over-reverse."""
    op = getattr(torch.ops.torch_convt, name)
    shapes, geometry = _OP_CASES[name]
    inputs = tuple(randn(shape, requires_grad=True) for shape in shapes)

    def fn(*t):
        return op(*t, *geometry)

    assert gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=True, check_batched_grad=True,
                     check_batched_forward_grad=True)
    assert gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_rev_over_rev=True, check_batched_grad=True,
                         fast_mode=True)


def test_autocast_still_casts_and_differentiates():
    model = torch.nn.Sequential(torch_convt.ConvTranspose2d(2, 3, 3, stride=2), torch_convt.Conv2d(3, 2, 2))
    reference = _reference_copy(model)
    x = randn((2, 2, 5, 5), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = model(x), reference(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close(got, expected)
    got.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# 5. parametrizations, serialization, deterministic mode
# ----------------------------------------------------------------------------------------------------------
_PARAMETRIZATIONS = {
    "spectral_norm": lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
    "weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m),
    "weight_norm_legacy": lambda m: torch.nn.utils.weight_norm(m),
}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("parametrization", list(_PARAMETRIZATIONS))
@pytest.mark.parametrize("nd", [2, 3])
def test_parametrizations_match_torch_nn(nd, parametrization):
    """Applied to our ConvTranspose2d/3d (torch.nn.ConvTranspose subclasses, so spectral_norm picks dim=1 for
    them too), a parametrization behaves as on the torch.nn layer: same forward, same gradients for the input
    and the parametrization's own parameters, over two passes (spectral_norm's power iteration updates its
    buffers in training mode), and the same state afterwards."""
    reference = getattr(torch.nn, f"ConvTranspose{nd}d")(3, 4, 3, stride=2, padding=1).double()
    ours = getattr(torch_convt, f"ConvTranspose{nd}d")(3, 4, 3, stride=2, padding=1).double()
    ours.load_state_dict(reference.state_dict())
    reference, ours = _PARAMETRIZATIONS[parametrization](reference), _PARAMETRIZATIONS[parametrization](ours)
    ours.load_state_dict(reference.state_dict())  # (spectral_norm draws its power-iteration vectors at random)
    for _ in range(2):
        x = randn((2, 3) + (4,) * nd, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, expected = ours(x), reference(x_ref)
        assert_close(out, expected)
        _tree_assert_close(_grads(ours, [x], out), _grads(reference, [x_ref], expected))
    _tree_assert_close(list(ours.state_dict().values()), list(reference.state_dict().values()))


def _converted_unet():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1))
    return torch_convt.convert(model, include_conv=True)


def test_serialization_state_dict_whole_model_deepcopy_pickle():
    model = _converted_unet()
    x = randn((2, 2, 4, 4, 6), torch.float32)
    expected = model(x)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # interchangeable with torch.nn's state_dict
    assert torch.equal(torch_convt.convert(fresh, include_conv=True)(x), expected)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"torch.load(weights_only=False)": torch.load(buffer, weights_only=False),
              "copy.deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model))}
    for how, clone in copies.items():
        assert type(clone[0]) is torch_convt.Conv3d and type(clone[2]) is torch_convt.ConvTranspose3d, how
        assert clone[2].weight is not model[2].weight, how
        assert torch.equal(clone(x), expected), how


def test_deterministic_algorithms_no_warnings_and_bitwise_repeatable(device):
    model = _converted_unet().to(device)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a "does not have a deterministic implementation" warning fails
            torch.use_deterministic_algorithms(True)
            runs = []
            x = randn((2, 2, 5, 4, 6), torch.float32, device)
            for _ in range(2):
                x = x.detach().clone().requires_grad_(True)
                out = model(x)
                runs.append([out] + list(_grads(model, [x], out)))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
