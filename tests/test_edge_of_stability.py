"""Full-batch gradient descent on real text (the corpus that ships with CPython) reaches the edge of
stability: λ_c·η/2 climbs to about 1 and hovers there (Cohen et al.; DESIGN.md §7). On every
measured state the fast and the paper search certify brackets that agree within the tolerance."""

import statistics

import torch
import torch.nn.functional as F

from megatron_sharpness.backends.pytorch import TorchBackend
from megatron_sharpness.data import embedded_corpus
from megatron_sharpness.search import critical_lr_search

TOL = 1 / 16


def test_full_batch_gd_hovers_at_the_edge_of_stability_and_both_searches_agree():
    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(embedded_corpus()[:1000]), dtype=torch.uint8).long()
    inputs, targets = data[:-1], data[1:]
    model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Tanh(), torch.nn.Linear(16, 32),
                                torch.nn.Tanh(), torch.nn.Linear(32, 256)).double()
    lr = 6.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    backend = TorchBackend(model, optimizer)
    backend.loss_fns = {None: lambda: F.cross_entropy(model(inputs), targets)}
    edge, forwards = [], {"fast": [], "paper": []}
    for step in range(1, 151):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        if step % 10:
            optimizer.step()
            continue
        backend.snapshot()
        optimizer.step()
        assert backend.after_step() is None
        backend.write(0.0)
        baseline = backend.loss(None)

        def loss_at(step_multiple):
            backend.write(step_multiple)
            return backend.loss(None)

        results = {method: critical_lr_search(loss_at, baseline, lr=lr, method=method,
                                              resolution_floor=backend.resolution_floor())
                   for method in ("fast", "paper")}
        backend.restore()
        fast, paper = results["fast"], results["paper"]
        assert fast.converged and paper.converged
        assert abs(fast.critical_lr / paper.critical_lr - 1) <= TOL
        for method, result in results.items():
            forwards[method].append(1 + result.forwards)
        edge.append(fast.critical_sharpness * lr / 2)
    later = edge[len(edge) // 3:]
    assert 0.85 <= statistics.median(later) <= 1.15, edge
    assert all(0.5 <= value <= 2.0 for value in later), edge
    assert statistics.median(forwards["fast"]) < statistics.median(forwards["paper"]), forwards
