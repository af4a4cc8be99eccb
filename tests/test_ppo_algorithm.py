"""PPO math against hand-computed cases (numbers worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from tunekit.ppo import algorithm as A


def close(x, y, tol=1e-6):
    return torch.allclose(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), atol=tol)


def test_gae_short_sequence_by_hand():
    # γ = 1, λ = 0.5, V = [.5, .6, .7], r = [0, 0, 1]:
    # δ2 = 1 − .7 = .3 → A2 = .3; δ1 = .7 − .6 = .1 → A1 = .1 + .5·.3 = .25; δ0 = .1 → A0 = .1 + .5·.25 = .225
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[0.225, 0.25, 0.3]])
    assert close(ret, [[0.725, 0.85, 1.0]])


def test_gae_lambda_one_gives_discounted_returns():
    # λ = 1: R_t = Σ_k γ^k r_{t+k} whatever V is; γ = .9, r = [0, 0, 1] → R = [.81, .9, 1]
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[3.0, -2.0, 0.4]])
    adv, ret = A.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    assert close(ret, [[0.81, 0.9, 1.0]])
    assert close(adv, [[0.81 - 3.0, 0.9 + 2.0, 0.6]])


def test_gae_ignores_padding():
    # Row of length 2 (third slot padding with junk): γ = 1, λ = .5, r = [2, 0], V = [1, .5]:
    # δ1 = 0 + 0 − .5 = −.5 → A1 = −.5; δ0 = 2 + .5 − 1 = 1.5 → A0 = 1.5 − .25 = 1.25; R = [2.25, 0, 0]
    rewards = torch.tensor([[2.0, 0.0, 9.0]])
    values = torch.tensor([[1.0, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[1.25, -0.5, 0.0]])
    assert close(ret, [[2.25, 0.0, 0.0]])


def test_clipped_policy_loss_by_hand():
    # ρ = [1.5, .5, 1.1, (3 padding)], A = [1, 1, −1, 5], ε = .2
    # token 0: max(−1.5, −1.2) = −1.2 (clipped); token 1: max(−.5, −.8) = −.5; token 2: max(1.1, 1.1) = 1.1
    # loss = (−1.2 − .5 + 1.1) / 3 = −.2, clip fraction 1/3
    ratio = torch.tensor([[1.5, 0.5, 1.1, 3.0]])
    old = torch.log(torch.tensor([[0.2, 0.4, 0.3, 0.1]]))
    new = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = A.clipped_policy_loss(new, old, adv, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 3, abs=1e-6)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert out.approx_kl.item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    out.loss.backward()
    # d/dlogπ: clipped token 0 → 0; token 1 → −A ρ / 3 = −.5/3; token 2 → 1.1/3; padding → 0
    assert close(new.grad, [[0.0, -0.5 / 3, 1.1 / 3, 0.0]])


def test_clipped_value_loss_by_hand():
    # V = [1, 0], V_old = [.5, .5], R = [1.2, 1], c = .2
    # token 0: (1 − 1.2)² = .04 vs V_clip = .7 → (.7 − 1.2)² = .25 → .25 (clipped)
    # token 1: (0 − 1)² = 1 vs V_clip = .3 → .49 → 1;   loss = ½ (.25 + 1) / 2 = .3125
    values = torch.tensor([[1.0, 0.0, 7.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[1.2, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, frac = A.clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.3125)
    assert frac.item() == pytest.approx(0.5)
    plain, _ = A.clipped_value_loss(values, old, returns, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (0.04 + 1.0) / 2)


def test_per_token_kl_estimators_by_hand():
    # π = .5, π_ref = .25: k1 = ln 2; ρ = π_ref/π = .5 → k3 = (.5 − 1) − ln .5 = ln 2 − .5
    lp, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    assert close(A.per_token_kl(lp, ref, "k1"), [math.log(2), -math.log(2)])
    # second token: ρ = 2 → k3 = 1 − ln 2
    assert close(A.per_token_kl(lp, ref, "k3"), [math.log(2) - 0.5, 1 - math.log(2)])
    with pytest.raises(ValueError):
        A.per_token_kl(lp, ref, "k2")


def test_kl_estimators_are_unbiased():
    # E_{y∼π}[k1] = E_{y∼π}[k3] = KL(π ‖ π_ref) exactly, on a 3-token vocabulary.
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert float((p * A.per_token_kl(p.log(), q.log(), est)).sum()) == pytest.approx(true_kl, abs=1e-6)


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    # β = .1: row 0 = [−.01, −.02, −.03 + 1]; row 1 (length 2) = [−.05, −.05 + 2, 0]
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = A.shaped_rewards(scores, kl, mask, kl_coef=0.1)
    assert close(r, [[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]])


def test_adaptive_kl_controller_update_by_hand():
    # β = .1, target 6, horizon 10000, batch of 256:
    # KL 9 → e = clip(.5) = .2 → β = .1 (1 + .2·256/10000) = .100512
    c = A.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.100512)
    # KL 3 → e = clip(−.5) = −.2 → β = .100512 (1 − .00512)
    assert c.update(3.0, 256) == pytest.approx(0.100512 * (1 - 0.00512))
    # KL 6.6 → e = .1 (inside the clip) → ×(1 + .00256)
    before = c.value
    assert c.update(6.6, 256) == pytest.approx(before * 1.00256)
    state = c.state_dict()
    d = A.AdaptiveKLController(0.5, target=6.0, horizon=10000)
    d.load_state_dict(state)
    assert d.value == c.value
    assert A.FixedKLController(0.05).update(100.0, 256) == 0.05


def test_masked_whiten_mean_var_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert A.masked_mean(x, m).item() == pytest.approx(2.0)
    assert A.masked_var(x, m).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert close(A.masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)
    assert close(A.masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)
    assert A.explained_variance(x, x, m) == pytest.approx(1.0)
    assert A.explained_variance(torch.full_like(x, 5.0), x, m) == pytest.approx(0.0)
    # V = R/2 on [1,2,3]: Var(R − V) = Var(R)/4 → EV = .75
    assert A.explained_variance(x / 2, x, m) == pytest.approx(0.75)


def test_logprobs_entropy_and_score_normalisation():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 2] = math.log(3.0)  # p = [1, 1, 3, 1] / 6
    lp = A.logprobs_of(logits, torch.tensor([[0, 2]]))
    assert close(lp, [[math.log(0.25), math.log(0.5)]])
    h = A.entropy_of(logits)
    assert h[0, 0].item() == pytest.approx(math.log(4))
    p = torch.tensor([1, 1, 3, 1]) / 6
    assert h[0, 1].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    s = A.normalize_scores(torch.tensor([1.0, 3.0]), whiten=True)
    assert close(s, [-math.sqrt(0.5), math.sqrt(0.5)], tol=1e-5)  # std of [1, 3] (unbiased) = √2
    assert close(A.normalize_scores(torch.tensor([-9.0, 0.5, 9.0]), clip=2.0), [-2.0, 0.5, 2.0])
