"""torch.compile traces a model that uses the loss without a graph break at the loss."""
import pytest
import torch

import lpjepa


class TinyModel(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, dim), torch.nn.ReLU())

    def forward(self, x1, x2, target, projections):
        parts = lpjepa.rectified_lpjepa_loss(
            self.net(x1), self.net(x2), target=target, projections=projections, backend="torch"
        )
        return parts.loss


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_loss_matches_eager_with_fullgraph(compile_backend):
    torch.manual_seed(0)
    model = TinyModel()
    x1, x2 = torch.randn(32, 8), torch.randn(32, 8)
    target = lpjepa.sample_rgg((32, 16))
    projections = lpjepa.reference.random_projections(24, 16)

    eager = model(x1, x2, target, projections)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))

    torch._dynamo.reset()
    # fullgraph=True turns any graph break into an error.
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    loss = compiled(x1, x2, target, projections)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_rdmreg_module_drawing_its_own_randomness_compiles_without_graph_break():
    torch._dynamo.reset()
    rdmreg = lpjepa.RDMReg(p=1.5, num_projections=8, backend="torch")
    compiled = torch.compile(rdmreg, backend="aot_eager", fullgraph=True)
    z = torch.randn(16, 4, requires_grad=True)
    loss = compiled(z, z * 0.5)
    loss.backward()
    assert torch.isfinite(loss) and z.grad is not None
