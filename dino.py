"""
dino.py: the DINO objective (self-distillation with no labels, Caron et al. 2021, arXiv 2104.14294) in
plain PyTorch, the second objective train.py offers beside LeJEPA (lejepa.py). CoralBay (arXiv 2606.03888)
trains its 3D Swin with it; here it trains either backbone on the same views as LeJEPA, so the two
objectives can be compared on equal terms (README: 2D slices against native 3D).

A student network (backbone + the head below) and a teacher of the same shape see the views of a sample.
The teacher sees only the two global views; its weights are an exponential moving average (EMA) of the
student's, never trained by gradient. Both map a view to K logits ("prototypes"); the student learns to
give every view the teacher's distribution over the K prototypes for the *other* global views:

    p_t = softmax((t - c) / tau_t)         teacher: centred by c, sharpened by a low temperature tau_t
    p_s = softmax(s / tau_s)               student: temperature tau_s = 0.1
    L   = mean over pairs (teacher global view i, student view v != i) of  -sum_k p_t[k] log p_s[k]

Two things keep the teacher from collapsing (the paper's section 5.3): centring (c, an EMA of the
teacher's batch mean, stops one prototype from winning every sample) and sharpening (a low tau_t stops
the uniform answer). Watch the teacher's entropy (teacher_entropy): near 0 or near log K is collapse.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU) -> L2 normalise -> K weight-normalised prototypes
    (DINO's head: 3 layers, hidden 2048, bottleneck 256, K = 65536; the last layer's norm is fixed at 1,
    the paper's norm_last_layer, so a logit is a cosine between the bottleneck and a prototype)."""

    def __init__(self, dim, hidden=2048, bottleneck=256, prototypes=65536):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))  # (K, b), normalised in forward
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # DINO's init: truncated normal, std 0.02, zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x):  # (N, dim)
        h = F.normalize(self.mlp(x), dim=-1)  # (N, b) on the unit sphere
        return h @ F.normalize(self.prototypes, dim=-1).T  # (N, K) cosines


def at_least_fp32(x):
    """bf16 logits under autocast -> float32 (a softmax over 65,536 prototypes at temperature 0.04 needs it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dino_loss(student, teacher, center, student_temp, teacher_temp):
    """student (V, B, K) logits of every view (the 2 global views first), teacher (2, B, K) logits of the
    global views, center (K,). Cross-entropy of each student view against each teacher view other than
    itself, averaged over the 2 * V - 2 pairs and the batch (DINO's loss, section 3.1)."""
    V, n_global = student.shape[0], teacher.shape[0]
    p_t = F.softmax((at_least_fp32(teacher) - center) / teacher_temp, dim=-1).detach()  # (2, B, K)
    log_p_s = F.log_softmax(at_least_fp32(student) / student_temp, dim=-1)  # (V, B, K)
    total, pairs = 0.0, 0
    for i in range(n_global):
        for v in range(V):
            if v == i:  # a view is not its own target
                continue
            total = total + (-(p_t[i] * log_p_s[v]).sum(-1)).mean()
            pairs += 1
    return total / pairs


def teacher_entropy(teacher, center, teacher_temp):
    """Mean entropy (nats) of the teacher's per-sample distribution: 0 = one prototype per sample
    (collapse by domination), log K = uniform (collapse by flattening). (N, K) -> scalar."""
    p = F.softmax((at_least_fp32(teacher) - center) / teacher_temp, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()


# -----------------------------------------------------------------------------
# The teacher's state: centre and EMA weights, updated once per optimiser step, after it

class Teacher:
    """DINO's teacher beside a student network (train.py's DaleCT): an EMA copy of its backbone and head,
    the centre, and the sums of this step's teacher outputs that the centre update needs."""

    def __init__(self, student, prototypes):
        self.net = copy.deepcopy(student).requires_grad_(False)  # starts equal to the student (DINO)
        self.net.heads = None  # DALE-CT's dense heads train the student only
        self.center = torch.zeros(prototypes, device=next(student.parameters()).device)  # (K,)
        self.sum, self.count = torch.zeros_like(self.center), 0

    @torch.no_grad()
    def __call__(self, xg):
        """Logits of the global views (2B, K); kept for the centre update at the end of the step."""
        out = self.net.project(xg)
        self.sum += out.float().sum(0)
        self.count += len(out)
        return out

    def step(self, student, momentum, center_momentum):
        """After the optimiser step: EMA of the student's weights, then the centre from the step's outputs."""
        ema_update(self.net, student, momentum)
        update_center(self.center, self.sum, self.count, center_momentum)
        self.sum.zero_()
        self.count = 0

    def state_dict(self):
        return {"net": self.net.state_dict(), "center": self.center}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.center.copy_(state["center"])


@torch.no_grad()
def update_center(center, teacher_sum, count, momentum):
    """c <- m c + (1 - m) * mean of the step's teacher logits over every rank (DINO: m = 0.9).
    teacher_sum (K,) is this rank's sum over its rows, count their number: one all-reduce adds both,
    so the centre is the same on every rank and equals one process's over the global batch."""
    both = torch.cat([teacher_sum.float(), teacher_sum.new_tensor([float(count)], dtype=torch.float32)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(both)
    center.mul_(momentum).add_(both[:-1] / both[-1], alpha=1 - momentum)
    return center


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m teacher + (1 - m) student, parameter by parameter (matched by name)."""
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.mul_(momentum).add_(s[name].detach(), alpha=1 - momentum)


def teacher_momentum(step, max_steps, start=0.996):
    """Cosine from start (0.996, DINO's default) to 1 at max_steps: the teacher freezes as training ends."""
    return 1 - (1 - start) * (math.cos(math.pi * min(step, max_steps) / max_steps) + 1) / 2


def teacher_temperature(step, warmup_steps, start=0.04, end=0.07):
    """Linear warm-up start -> end over warmup_steps, then end (DINO: 0.04 -> 0.07 over 30 of 100 epochs):
    a sharper teacher early, while the student's outputs are still near uniform."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
