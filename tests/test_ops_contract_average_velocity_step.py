"""The autograd contract of ``meancache.ops.average_velocity_step``, against the same transforms of its eager
composite (``average_velocity_step_reference``)."""

import pytest
import torch

from meancache.ops import average_velocity_step, average_velocity_step_reference
from tests import ops_contract as contract
from tests.ops_contract import Mode

# (shape, sigmas): odd shapes, one sigma triple as floats, or per-sample tensors (batch 1 and batch 3)
PER_SAMPLE = ([0.9, 0.8, 0.7], [0.7, 0.5, 0.4], [0.6, 0.45, 0.3])
CASES = (((1, 7), (0.93, 0.71, 0.64)), ((3, 2, 5), tuple(torch.tensor(s, dtype=torch.float64) for s in PER_SAMPLE)))
OUT_NOT_DIFFERENTIABLE = (RuntimeError, r"out=\.\.\.\) is not differentiable")
OUT_NOT_TRANSFORMABLE = (RuntimeError, r"out=\.\.\.\) does not support forward-mode AD or torch\.func transforms")

MODES = {
    "backward": Mode(contract.backward, "the composite's backward"),
    "double backward": Mode(contract.double_backward, "the composite's double backward (zero: the map is linear)"),
    "forward AD (`torch.func.jvp`)": Mode(contract.jvp, "the composite under `torch.func.jvp`"),
    "forward AD (`fwAD` dual level)": Mode(contract.dual_level, "the composite under a dual level"),
    "nested forward AD (`jvp` of `jvp`)": Mode(contract.jvp_of_jvp, "the same nesting of the composite"),
    "forward-over-reverse (`jvp` of `vjp`)": Mode(contract.jvp_of_vjp, "the same transforms of the composite"),
    "forward-over-reverse (dual level + `autograd.grad`)": Mode(
        contract.dual_over_backward, "the same of the composite"
    ),
    "reverse-over-forward (`vjp` of `jvp`)": Mode(contract.vjp_of_jvp, "the same transforms of the composite"),
    "reverse-over-forward (dual level + `autograd.grad`)": Mode(
        contract.backward_of_dual,
        "the same transforms of the composite with `torch.func`",
        reference_transform=contract.vjp_of_jvp,
    ),
    "`torch.func.vmap`": Mode(contract.vmap, "`vmap` of the composite"),
    "`torch.func.grad`": Mode(contract.grad, "the composite under `torch.func.grad`"),
    "`jacfwd`": Mode(contract.jacfwd, "`jacfwd` of the composite"),
    "`jacrev`": Mode(contract.jacrev, "`jacrev` of the composite"),
    "`torch.compile(fullgraph=True)`, outputs and backward (float sigmas)": Mode(
        contract.compiled, "the eager composite", dtypes=(torch.float32,)
    ),
    "`torch.compile(fullgraph=True)` (tensor sigmas)": Mode(
        contract.compiled,
        "Dynamo cannot trace the host read of sigma tensors; pass Python floats, or compile without fullgraph",
        (torch._dynamo.exc.Unsupported, "tolist"),
    ),
    "backward with `out=`": Mode(
        contract.backward,
        "`out=` writes into given tensors; call without `out=` under autograd",
        OUT_NOT_DIFFERENTIABLE,
    ),
    "`torch.func` transforms with `out=`": Mode(
        contract.jvp, "call without `out=` under `jvp`, `grad`, `vmap`", OUT_NOT_TRANSFORMABLE
    ),
}


def _case_applies(mode: str, case) -> bool:
    """Modes naming a kind of sigmas run on the cases with that kind, the others on every case."""
    floats = isinstance(case[1][0], float)
    return not (("float sigmas" in mode and not floats) or ("tensor sigmas" in mode and floats))


def _inputs(shape, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(8)]


def _functions(mode, sigmas):
    def ours(*tensors):
        if "out=" not in mode:
            return average_velocity_step(*tensors, *sigmas)
        out = (torch.empty_like(tensors[0]), torch.empty_like(tensors[0]))
        return average_velocity_step(*tensors, *sigmas, out=out)

    return ours, lambda *tensors: average_velocity_step_reference(*tensors, *sigmas)


def _params(devices=contract.DEVICES):
    for device in devices:
        marks = [pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(), reason="needs a GPU")]
        for mode, spec in MODES.items():
            for dtype in spec.dtypes if not spec.refused else (torch.float64,):
                for index, case in enumerate(CASES):
                    if _case_applies(mode, case):
                        yield pytest.param(
                            mode, dtype, case, device, id=f"{device}-{mode}-{dtype}-{index}", marks=marks
                        )


@pytest.mark.parametrize(("mode", "dtype", "case", "device"), list(_params()))
def test_mode(mode, dtype, case, device):
    """A supported mode matches the same transform of the composite by flash-attention's tolerance rule; a
    refused one raises the documented error."""
    spec = MODES[mode]
    shape, sigmas = case
    ours, reference = _functions(mode, sigmas)
    tensors = _inputs(shape, torch.float64, device)
    inputs, directions = tensors[:4], tensors[4:]

    contract.check_mode(spec, ours, reference, inputs, directions, dtype)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_and_gradgradcheck_in_float64(case):
    shape, sigmas = case
    inputs = [t.requires_grad_() for t in _inputs(shape, torch.float64)[:4]]
    ours = lambda *t: average_velocity_step(*t, *sigmas)  # noqa: E731
    assert torch.autograd.gradcheck(ours, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(ours, inputs, check_fwd_over_rev=True)


@pytest.mark.parametrize("dtype", tuple(contract.ATOL))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("requires_grad", (True, False))
def test_opcheck(case, dtype, requires_grad):
    """``torch.library.opcheck`` on the dispatcher op (registered by the C++ extension, with the autograd and
    vmap rules registered from Python): schema, autograd registration, fake tensors, AOT dispatch."""
    shape, sigmas = case
    tables = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in sigmas]
    tensors = [t.requires_grad_(requires_grad) for t in _inputs(shape, dtype)[:4]]
    torch.library.opcheck(torch.ops.meancache.average_velocity_step.default, (*tensors, *tables))


@pytest.mark.parametrize("dtype", tuple(contract.ATOL))
def test_opcheck_of_the_out_overload(dtype, case=CASES[1]):
    """The ``.out`` overload (not differentiable): schema, autograd registration, fake tensors. AOT dispatch is
    left out: PyTorch does not functionalize a custom op whose outputs alias its ``out`` arguments."""
    shape, sigmas = case
    tables = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in sigmas]
    tensors = _inputs(shape, dtype)[:4]
    out = {"z_next": torch.empty_like(tensors[0]), "u_hat": torch.empty_like(tensors[0])}
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.meancache.average_velocity_step.out, (*tensors, *tables), out, test_utils=utils)


def test_the_docs_table_is_the_suite():
    """``docs/autograd_modes.md`` holds exactly the table of modes this suite proves."""
    assert contract.documented_table("average_velocity_step") == contract.table("average_velocity_step", MODES)
