"""A GRPO-style step on a tiny random policy (made here, no downloads), as
docs/rl-distillation.md runs it: klx's loss and its gradients with respect to the policy's
parameters, against the same step written by hand in float64 torch (log_softmax, gather,
the entropy and KL sums, the masked means by loops over the sequences)."""

from __future__ import annotations

import pytest

import klx

V, H, L, PROMPTS, G = 24, 8, 6, 3, 4
T, BETA, ENT, CLIP = 0.7, 0.05, 0.01, 0.2


def _rollout(torch, policy):
    """Responses sampled at temperature T, token 0 ending each; one rollout aborted."""
    gen = torch.Generator().manual_seed(1)
    seq = [torch.randint(1, V, (PROMPTS,), generator=gen).repeat_interleave(G)]
    with torch.no_grad():
        for _ in range(L):
            probs = torch.softmax(policy(seq[-1]) / T, dim=-1)
            seq.append(torch.multinomial(probs, 1, generator=gen).squeeze(-1))
    seq = torch.stack(seq, dim=1)
    inputs, responses = seq[:, :-1], seq[:, 1:]
    before = torch.cumsum(responses == 0, dim=1) - (responses == 0).long()
    mask = before == 0
    mask[2] = False
    return inputs, responses, mask


def _model(torch, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(V, H), torch.nn.Tanh(), torch.nn.Linear(H, V)
    ).double()


@pytest.mark.backends("torch", reason="a torch model and its autograd")
def test_grpo_step_against_the_hand_written_step(backend):
    import torch

    policy, reference = _model(torch, 0), _model(torch, 1)
    reference.requires_grad_(False)
    inputs, responses, mask = _rollout(torch, policy)
    group_ids = torch.arange(PROMPTS).repeat_interleave(G)
    reward = ((responses % 5 == 0) & mask).sum(1).double()
    r = reward.view(PROMPTS, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)
    with torch.no_grad():
        old_logp = torch.log_softmax(policy(inputs) / T, -1).gather(-1, responses[..., None])[
            ..., 0
        ]
        old_logp = old_logp + 0.01 * torch.randn(old_logp.shape, dtype=old_logp.dtype)

    def step(by_klx):
        policy.zero_grad()
        logits, ref_logits = policy(inputs), reference(inputs)
        if by_klx:
            s = klx.token_stats(logits, responses, ref_logits, temperature=T, where=mask)
            logp, entropy, kl = s["logprob"], s["entropy"], s["kl"]
        else:
            lp = torch.log_softmax(logits / T, -1)
            lr = torch.log_softmax(ref_logits / T, -1)
            logp = lp.gather(-1, responses[..., None])[..., 0]
            entropy = -(lp.exp() * lp).sum(-1)
            kl = (lp.exp() * (lp - lr)).sum(-1)
        ratio = torch.exp(logp - old_logp)
        pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
        if by_klx:
            loss = klx.aggregate(pg + BETA * kl, "seq-mean-token-mean", where=mask)
            loss = loss - ENT * klx.aggregate(entropy, "token-mean", where=mask)
            k3 = klx.kl_estimate(
                logp, old_logp, where=mask, reduction="group-mean-token-mean", group_ids=group_ids
            )
            loss = loss + BETA * k3
        else:
            m = mask.double()
            per_seq = [
                ((pg + BETA * kl)[i] * m[i]).sum() / m[i].sum() for i in range(len(m)) if m[i].any()
            ]
            loss = sum(per_seq) / len(per_seq)
            loss = loss - ENT * (entropy * m).sum() / m.sum()
            rr = old_logp - logp
            k3 = (torch.exp(rr) - 1 - rr) * m
            groups = [i for i in range(PROMPTS) if m[i * G : (i + 1) * G].any()]
            loss = loss + BETA * sum(
                k3[g * G : (g + 1) * G].sum() / m[g * G : (g + 1) * G].sum() for g in groups
            ) / len(groups)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in policy.parameters()]

    value, grads = step(True)
    want, want_grads = step(False)
    assert abs(value - want) <= 1e-12 * max(1.0, abs(want))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
