"""DecoupledLionW against the update rule written out by hand."""

import torch

from dbrx_train.training.lion import DecoupledLionW


def test_lion_matches_hand_written_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = DecoupledLionW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    ref_p, ref_m = p.detach().clone(), torch.zeros(5, 3)
    for _ in range(3):
        grad = torch.randn(5, 3)
        p.grad = grad.clone()
        opt.step()
        ref_p *= 1 - 0.01 * 0.1 / 0.1  # decoupled: wd scaled by lr / initial_lr, not by lr
        ref_p -= 0.1 * torch.sign(0.9 * ref_m + 0.1 * grad)
        ref_m = 0.99 * ref_m + 0.01 * grad
        torch.testing.assert_close(p.detach(), ref_p)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_m)


def test_lion_decay_follows_the_schedule():
    p = torch.nn.Parameter(torch.ones(2))
    opt = DecoupledLionW([p], lr=1.0, weight_decay=0.1)
    opt.param_groups[0]["lr"] = 0.5  # a scheduler halved the lr
    p.grad = torch.zeros(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), 1 - 0.1 * 0.5))
