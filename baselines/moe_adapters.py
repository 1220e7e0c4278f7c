"""moe-adapters: MoE-Adapters4CL (Yu et al., CVPR 2024), faithful to the official ``mtil/`` code.

Read this file top to bottom: the experts, the per-block mixture, the per-task autoencoders
that choose a router at test time (DDAS), the evaluation protocol that uses them, then the
method. Every place where we differ from the official code says so (docs/FIDELITY.md lists
them all).

1. Where the adapters sit. Every transformer block the backbone declares in
   ``info["adapter_blocks"]`` (moram_bench/adapters/inject.py, ``AdaptedBlock``) gets one
   ``MoEAdapterLayer``, placed as in the official ``ResidualAttentionBlock.forward``::

       u   = x + attn(ln_1(x))                    # the residual stream after attention
       out = u + mlp(ln_2(u)) + moe(u)            # the mixture reads u (un-normalised)

   open_clip ViT and text transformers: every block of both towers (the official
   ``AdapterDoubleEncoder`` setting). ``mini-clip``: its image tower is a CNN with no
   transformer blocks, so only the six MiniLM text layers carry adapters (post-LN BERT
   layers: the mixture reads the attention output and adds beside the MLP, inside the
   final LayerNorm's residual sum).

2. The mixture (per block). 22 bottleneck experts ``d -> 64 -> d`` (down-projection with
   bias, kaiming-uniform(a=sqrt 5); ReLU; dropout 0.1 on the hidden units; up-projection
   with bias, both ZERO-initialised; output x 0.1), so an untrained layer changes nothing.
   One router per task: a gate matrix ``W_g`` and a noise matrix ``W_n`` (``d x 22``, both
   zero-initialised). Noisy top-k gating (Shazeer et al. 2017), per SAMPLE from the first
   token of ``u`` (the [CLS] token; on a causal text tower the start token, identical for
   every prompt, as in the official code)::

       logits = u0 @ W_g  (+ N(0, 1) * (softplus(u0 @ W_n) + 0.01)   in training only)
       gates  = softmax over the top-2 logits, 0 elsewhere
       moe(u) = sum_e gates_e * 0.1 * up_e(dropout(relu(down_e(u))))   on every token

   Only the current task's router trains; routers of earlier tasks are frozen (in the
   official code they are trainable but receive no gradient: same thing).

3. Activate-freeze. During a task's training every layer counts how often each expert is
   selected (per sample, each of the top-2). After the task the two most selected experts
   of each layer are frozen for good (``torch.topk`` of the counts, as the official
   ``frozen_list``); the others stay trainable for later tasks. Under DDP the counts are
   summed over ranks first, so every rank freezes the same experts.

4. Load balancing. The official code computes ``1e-2 * (cv^2(importance) + cv^2(load))``
   (``load`` from the noisy gate's probability of being in the top-k) and never adds it to
   the loss. Default: not added (and not computed, which changes nothing);
   ``balance_loss: true`` adds it.

5. DDAS (distribution discriminative auto-selector). Per task, an autoencoder
   ``Linear(D, c) + ReLU -> Linear(c, D) + Sigmoid`` is trained (MSE) to reconstruct
   ``sigmoid(f(x))`` of that task's training images, ``f`` a FROZEN image feature
   extractor. Official: AlexNet conv5 features (256x13x13), ``c = 100``, Adam (weight decay
   1e-4), 300 iterations of batch 64 at lr 0.003 (few-shot chooser; 0.01 full-shot; its
   step decay counts full-training-set epochs and does not trigger). No AlexNet weights
   exist offline, so ``f`` is the frozen backbone's own image feature: its un-adapted
   image embedding (every router off, before normalisation; from cached trunk features
   where the DataModule caches them). ``c`` is ``min(100, D // 4)`` so that the code
   stays a bottleneck for small features. At test time each image (per sample, default) or
   each batch (``ddas_batch: true``, the official rule) gets the router of the task whose
   autoencoder reconstructs it best, provided that error is within that task's threshold;
   when every error is above its threshold the frozen ZERO-SHOT model is used (no adapter,
   in either tower). Thresholds: the official single absolute value (0.0655 on AlexNet
   features) has no meaning on other features, so by default each task's threshold is
   calibrated on its own training data: the ``ddas_quantile`` (0.99) quantile of the
   per-sample reconstruction errors, times ``ddas_margin`` (1.0). ``ddas_threshold: <float>``
   sets one absolute threshold for all tasks instead (the official form). The official
   chooser also has an extra autoencoder trained on TinyImageNet whose win means
   zero-shot; streams here have no such reference domain, so only the thresholds decide the
   fall-back.

6. Evaluation. The class prompts are encoded once per evaluation for every router state
   (zero-shot and each task's router: the text tower carries adapters too, as in the
   official ``zeroshot_classifier``); each test image is scored with its chosen router's
   image embedding against the same router's class embeddings. The label space is the
   stream's (no task id). Per-sample DDAS is the default because a batch-level decision on
   a batch holding one test domain leaks task identity (the suite's fairness rule);
   ``ddas_batch: true`` is the official per-batch choice, recorded in metrics.json and in
   the leaderboard row's name.

7. Routing report. The DDAS module meets the suite's routing-statistics protocol
   (moram_bench/routing.py): for each test domain, the share of its images sent to each
   task's router (``routing.csv``) and the share sent to the zero-shot model
   (``fallback_rate`` in ``routing.json``). Expert usage (training selection counts, the
   experts frozen per layer) is in ``extra_metrics()``.

Training loss, iterations and batch are the stream's and the shared protocol's (identical
for every method; the official loss is image->text cross-entropy with label smoothing 0.2).
The optimiser is the official AdamW (betas 0.9/0.999, no weight decay, cosine) at lr 1e-3,
the value most of its datasets use (it ranges 1e-4..1e-2 per dataset): see
conf/method/moe-adapters.yaml.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moram_bench.adapters import aux_loss
from moram_bench.adapters.inject import inject_block_adapters
from moram_bench.adapters.moe import cv_squared  # the load-balancing statistic MoE-LoRA uses too
from moram_bench.adapters.routing_stats import add_routing_stats, reset_routing_stats
from moram_bench.config import ConfigError
from moram_bench.method import ContinualModule
from moram_bench.protocols.clip import ClipProtocol, gather_with_grad
from moram_bench.registry import register_method

DDAS_FEATURES = "frozen backbone image features (official: AlexNet conv5; no AlexNet weights offline)"


# ---------------------------------------------------------------------------------------
# 1-4. the per-block mixture of bottleneck experts
# ---------------------------------------------------------------------------------------
class BottleneckExpert(nn.Module):
    """One adapter ``d -> bottleneck -> d``: down (kaiming, zero bias), ReLU, up (zero)."""

    def __init__(self, d: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)


class MoEAdapterLayer(nn.Module):
    """The mixture of one block: ``experts`` bottleneck adapters, one router per task.

    Which router runs is set from outside with ``set_route``: an int (a task's router, or
    -1: no adapter at all, the zero-shot model) or a LongTensor ``(batch,)`` with one router
    (or -1) per sample. ``grow()`` appends this task's router (zero) and freezes the earlier
    ones; ``freeze()`` (end of a task) freezes the current router and the ``freeze_top``
    most selected experts (activate-freeze).

    State: ``experts.<e>.{down,up}.{weight,bias}``, ``gate.<t>``, ``noise.<t>``, and the
    persistent buffers ``selection_counts`` (tasks x experts) and ``expert_frozen``; after
    ``load_state_dict`` the experts' ``requires_grad`` follow ``expert_frozen``.
    """

    def __init__(self, d: int, experts: int = 22, bottleneck: int = 64, top_k: int = 2, dropout: float = 0.1,
                 scale: float = 0.1, noise_epsilon: float = 1e-2, freeze_top: int = 2, balance_coef: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..experts={experts} (got {top_k})")
        self.d, self.n_experts, self.top_k = int(d), int(experts), int(top_k)
        self.scale, self.noise_epsilon = float(scale), float(noise_epsilon)
        self.freeze_top, self.balance_coef = int(freeze_top), float(balance_coef)
        self.p_drop = float(dropout)
        self.experts = nn.ModuleList(BottleneckExpert(d, bottleneck) for _ in range(experts))
        self.gate = nn.ParameterList()
        self.noise = nn.ParameterList()
        self.register_buffer("selection_counts", torch.zeros(0, experts, dtype=torch.float64))
        self.register_buffer("expert_frozen", torch.zeros(experts, dtype=torch.bool))
        self.route: int | torch.Tensor = -1
        self.register_load_state_dict_post_hook(lambda module, keys: module.apply_frozen())

    @property
    def n_routers(self) -> int:
        return len(self.gate)

    def extra_repr(self) -> str:
        return (f"d={self.d}, experts={self.n_experts}, top_k={self.top_k}, routers={self.n_routers}, "
                f"frozen={int(self.expert_frozen.sum())}, scale={self.scale}, dropout={self.p_drop}")

    # ---- growth and freezing --------------------------------------------------------
    @torch.no_grad()
    def grow(self) -> None:
        """Append this task's router (gate and noise matrices, zero) and its counts row;
        earlier routers are frozen."""
        ref = self.experts[0].down.weight
        for p in list(self.gate) + list(self.noise):
            p.requires_grad_(False)
        self.gate.append(nn.Parameter(torch.zeros(self.d, self.n_experts, device=ref.device, dtype=ref.dtype)))
        self.noise.append(nn.Parameter(torch.zeros(self.d, self.n_experts, device=ref.device, dtype=ref.dtype)))
        self.selection_counts = torch.cat([self.selection_counts, self.selection_counts.new_zeros(1, self.n_experts)])

    @torch.no_grad()
    def freeze(self, counts: torch.Tensor | None = None) -> list[int]:
        """Activate-freeze after a task: freeze the current router and the ``freeze_top``
        experts with the highest selection ``counts`` (default: this layer's counts of its
        last router). Returns the experts frozen now (some may have been frozen before)."""
        for p in list(self.gate) + list(self.noise):
            p.requires_grad_(False)
        if counts is None:
            counts = self.selection_counts[-1]
        top = torch.topk(counts.to(torch.float64), min(self.freeze_top, self.n_experts)).indices
        self.expert_frozen[top] = True
        self.apply_frozen()
        return sorted(int(i) for i in top)

    def apply_frozen(self) -> None:
        for e, expert in enumerate(self.experts):
            expert.requires_grad_(not bool(self.expert_frozen[e]))

    def set_route(self, route: int | torch.Tensor) -> None:
        self.route = route

    # ---- gating ----------------------------------------------------------------------
    def _project(self, u0: torch.Tensor, weights: nn.ParameterList, router: int | torch.Tensor) -> torch.Tensor:
        """``u0 @ W[router]`` with one router for all samples (int) or one per sample."""
        if isinstance(router, int):
            return u0 @ weights[router].to(u0.dtype)
        return torch.einsum("bd,bde->be", u0, torch.stack(list(weights)).to(u0.dtype)[router])

    def gates(self, u0: torch.Tensor, router: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noisy top-k gating of first tokens ``u0 (B, d)`` with router ``router`` (an int,
        or ``(B,)`` per-sample routers, all >= 0). Returns dense gates ``(B, E)``, the
        selected experts ``(B, k)`` and the balancing term (training with
        ``balance_coef > 0``, else None)."""
        clean = self._project(u0, self.gate, router)
        noisy_train = self.training
        if noisy_train:
            std = F.softplus(self._project(u0, self.noise, router)) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        m = min(self.top_k + 1, self.n_experts)
        top_logits, top_idx = logits.topk(m, dim=-1)
        k_idx = top_idx[:, :self.top_k]
        k_gates = torch.softmax(top_logits[:, :self.top_k], dim=-1)
        dense = torch.zeros_like(logits).scatter(1, k_idx, k_gates)
        balance = None
        if self.training and self.balance_coef > 0 and aux_loss.collecting():
            if noisy_train and self.top_k < self.n_experts:
                load = self._prob_in_top_k(clean, logits, std, top_logits).sum(0)
            else:
                load = (dense > 0).sum(0).float()
            balance = self.balance_coef * (cv_squared(dense.sum(0)) + cv_squared(load))
        return dense, k_idx, balance

    def _prob_in_top_k(self, clean, noisy, std, noisy_top):
        """Probability of each expert to be in the top-k under fresh noise (differentiable)."""
        normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
        thr_in = noisy_top[:, self.top_k:self.top_k + 1]       # (k+1)-th largest noisy logit
        thr_out = noisy_top[:, self.top_k - 1:self.top_k]      # k-th largest
        is_in = noisy > thr_in
        return torch.where(is_in, normal.cdf((clean - thr_in) / std), normal.cdf((clean - thr_out) / std))

    # ---- forward ---------------------------------------------------------------------
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``moe(u)`` for the residual stream ``u (B, L, d)`` (zeros where no router runs)."""
        route = self.route
        if isinstance(route, int):
            if route < 0 or self.n_routers == 0:
                return torch.zeros_like(u)
            router, active = route, None
        else:
            router = route.to(u.device)
            if router.shape[0] != u.shape[0]:
                raise RuntimeError(f"per-sample routes for {router.shape[0]} samples, input has {u.shape[0]}")
            active = router >= 0
            if not bool(active.any()):
                return torch.zeros_like(u)
            router = router.clamp_min(0)
        squeeze = u.dim() == 2
        x = u[:, None] if squeeze else u                                      # (B, L, d)
        dense, idx, balance = self.gates(x[:, 0], router)
        if balance is not None:
            aux_loss.emit(balance)
        if self.training and torch.is_grad_enabled():
            self._count(idx, router)
        g = dense.gather(1, idx).to(x.dtype)                                  # (B, k)
        w_down = torch.stack([e.down.weight for e in self.experts]).to(x.dtype)[idx]   # (B, k, h, d)
        b_down = torch.stack([e.down.bias for e in self.experts]).to(x.dtype)[idx]     # (B, k, h)
        w_up = torch.stack([e.up.weight for e in self.experts]).to(x.dtype)[idx]       # (B, k, d, h)
        b_up = torch.stack([e.up.bias for e in self.experts]).to(x.dtype)[idx]         # (B, k, d)
        h = torch.relu(torch.einsum("bld,bkhd->bklh", x, w_down) + b_down[:, :, None])
        h = F.dropout(h, p=self.p_drop, training=self.training)
        y = torch.einsum("bklh,bkdh->bkld", h, w_up) + b_up[:, :, None]
        out = self.scale * torch.einsum("bk,bkld->bld", g, y)
        if active is not None:
            out = out * active[:, None, None].to(out.dtype)
        return out[:, 0] if squeeze else out

    @torch.no_grad()
    def _count(self, idx: torch.Tensor, router: int | torch.Tensor) -> None:
        """Selection counts (training): each sample adds 1 to each of its top-k experts."""
        if isinstance(router, int):
            router = torch.full((idx.shape[0],), router, dtype=torch.long, device=idx.device)
        for r in router.unique().tolist():
            sel = idx[router == r].reshape(-1)
            self.selection_counts[r] += torch.bincount(sel, minlength=self.n_experts).to(self.selection_counts)


# ---------------------------------------------------------------------------------------
# 5. DDAS: per-task autoencoders that choose the router
# ---------------------------------------------------------------------------------------
class TaskAutoencoder(nn.Module):
    """``Linear(D, c) + ReLU`` then ``Linear(c, D) + Sigmoid`` (the official architecture)."""

    def __init__(self, dim: int, code: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, code), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(code, dim), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DDAS(nn.Module):
    """One autoencoder and one threshold per task; chooses a router (or -1: zero-shot).

    Inputs are raw frozen features; the autoencoders see ``sigmoid(features)`` (official).
    Also the routing-statistics protocol of moram_bench/routing.py: with ``record_routing``
    set, ``choose`` counts the images sent to each task's router (``routing_mass_by_task``)
    and to the zero-shot model (``routing_fallback``).
    """

    def __init__(self, dim: int, code: int = 100):
        super().__init__()
        self.dim = int(dim)
        self.code = max(1, min(int(code), self.dim // 4))
        self.autoencoders = nn.ModuleList()
        self.register_buffer("thresholds", torch.zeros(0, dtype=torch.float64))
        add_routing_stats(self)

    @property
    def n_tasks(self) -> int:
        return len(self.autoencoders)

    def grow(self) -> None:
        """Append this task's (untrained) autoencoder and a placeholder threshold."""
        ref = self.thresholds
        self.autoencoders.append(TaskAutoencoder(self.dim, self.code).to(ref.device))
        self.thresholds = torch.cat([self.thresholds, ref.new_full((1,), float("inf"))])
        self.routing_mass = torch.cat([self.routing_mass, self.routing_mass.new_zeros(1)])

    def errors(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction MSE of every autoencoder: ``(B, tasks)``."""
        target = torch.sigmoid(feats.float())
        return torch.stack([((ae(target) - target) ** 2).mean(-1) for ae in self.autoencoders], dim=-1)

    @torch.no_grad()
    def choose(self, feats: torch.Tensor, per_batch: bool = False) -> torch.Tensor:
        """The router of each sample ``(B,)``: argmin error among the autoencoders within
        their thresholds, -1 (zero-shot) when none is. ``per_batch``: one decision from the
        batch-mean errors (official), broadcast to every sample."""
        n = feats.shape[0]
        if self.n_tasks == 0:
            out = torch.full((n,), -1, dtype=torch.long, device=feats.device)
        else:
            err = self.errors(feats).double()
            if per_batch:
                err = err.mean(0, keepdim=True)
            err = torch.where(err <= self.thresholds.to(err.device), err, torch.full_like(err, float("inf")))
            best = err.argmin(-1)
            best = torch.where(torch.isfinite(err.min(-1).values), best, torch.full_like(best, -1))
            out = best.expand(n) if per_batch else best
        if self.record_routing:
            chosen = out[out >= 0]
            self.routing_mass += torch.bincount(chosen, minlength=self.n_tasks).to(self.routing_mass)[:self.n_tasks]
            self.routing_tokens += n
            self.routing_fallback += int((out < 0).sum())
        return out

    @torch.enable_grad()
    def fit(self, task: int, feats: torch.Tensor, iterations: int = 300, batch_size: int = 64, lr: float = 0.003,
            weight_decay: float = 1e-4, quantile: float = 0.99, margin: float = 1.0,
            threshold: float | None = None, generator: torch.Generator | None = None) -> dict:
        """Train autoencoder ``task`` on ``feats (N, D)`` as the official chooser does
        (Adam, ``iterations + 1`` steps of ``batch_size`` shuffled samples, MSE), then set
        its threshold. Returns a summary. (The official step decay, x0.1 every 10 epochs,
        counts epochs of the FULL training set, so it does not trigger within 300
        iterations on its datasets: the rate is constant here.)"""
        ae = self.autoencoders[task]
        target = torch.sigmoid(feats.float()).to(self.thresholds.device)
        n = target.shape[0]
        opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
        per_epoch = max(1, math.ceil(n / batch_size))
        order = torch.randperm(n, generator=generator)
        for it in range(iterations + 1):
            if it % per_epoch == 0:
                order = torch.randperm(n, generator=generator)
            b = order[(it % per_epoch) * batch_size:(it % per_epoch + 1) * batch_size]
            loss = F.mse_loss(ae(target[b]), target[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            own = ((ae(target) - target) ** 2).mean(-1).double()
            thr = float(threshold) if threshold is not None else float(torch.quantile(own, quantile)) * margin
            self.thresholds[task] = thr
        return {"samples": n, "final_loss": float(loss.detach()), "threshold": thr, "train_error_mean": float(own.mean())}

    # ---- routing-statistics protocol (moram_bench/routing.py) -------------------------
    def reset_routing(self) -> None:
        reset_routing_stats(self)

    def routing_mass_by_task(self) -> torch.Tensor:
        return self.routing_mass.clone()


# ---------------------------------------------------------------------------------------
# 6. evaluation with DDAS
# ---------------------------------------------------------------------------------------
class MoEAdaptersProtocol(ClipProtocol):
    """The CLIP protocol with router selection: training routes everything through the
    current task's router; evaluation lets DDAS choose per sample (or per batch) and scores
    each image against the class embeddings of its own router state."""

    def __init__(self, module: "MoEAdapters"):
        super().__init__(module)
        self._eval_text_by_route: torch.Tensor | None = None

    def loss(self, batch: dict, task: int):
        with self.m.routing(task):
            return super().loss(batch, task)

    @torch.no_grad()
    def on_eval_start(self) -> None:
        prompts = self.stream.all_prompts()
        states = []
        for route in range(-1, self.m.ddas.n_tasks):  # -1: zero-shot, then each task's router
            with self.m.routing(route):
                states.append(torch.cat([self.encode_prompts(prompts[i:i + 256]) for i in range(0, len(prompts), 256)]))
        self._eval_text_by_route = torch.stack(states)          # (1 + tasks, classes, e)

    def logits(self, batch: dict, task: int) -> torch.Tensor:
        route = self.m.choose_routes(batch)                     # (B,), -1 = zero-shot
        with self.m.routing(route):
            img = self.encode_images(batch)                     # (B, e), each with its own router
        text = self._eval_text_by_route[:, self.stream.class_slice(task)]   # (1 + tasks, C, e)
        return torch.einsum("be,bce->bc", img, text[route + 1])

    def on_eval_end(self) -> None:
        self._eval_text_by_route = None


# ---------------------------------------------------------------------------------------
# 7. the method
# ---------------------------------------------------------------------------------------
class _Routing:
    """Context manager: set every layer's route, restore the previous one on exit."""

    def __init__(self, layers: list[MoEAdapterLayer], route):
        self.layers, self.route = layers, route

    def __enter__(self):
        self.saved = [layer.route for layer in self.layers]
        for layer in self.layers:
            layer.set_route(self.route)

    def __exit__(self, *exc):
        for layer, r in zip(self.layers, self.saved):
            layer.set_route(r)


@register_method("moe-adapters")
class MoEAdapters(ContinualModule):
    """MoE-Adapters4CL: 22 bottleneck experts per block, a router per task, activate-freeze, DDAS."""

    modalities = ("image",)
    ranges = {"experts": ">= 1", "top_k": ">= 1", "bottleneck": ">= 1", "dropout": "in [0, 1)", "scale": "> 0",
              "freeze_top": ">= 0", "balance_coef": ">= 0", "ddas_code": ">= 1", "ddas_iterations": ">= 0",
              "ddas_batch_size": ">= 1", "ddas_lr": "> 0", "ddas_quantile": "in [0, 1]", "ddas_margin": "> 0"}

    @classmethod
    def validate_config(cls, h) -> None:
        super().validate_config(h)
        if int(h.top_k) > int(h.experts):
            raise ConfigError(f"method.top_k={h.top_k} exceeds method.experts={h.experts}")
        if int(h.freeze_top) > int(h.experts):
            raise ConfigError(f"method.freeze_top={h.freeze_top} exceeds method.experts={h.experts}")
        thr = h.get("ddas_threshold")
        if thr is not None and not float(thr) > 0:
            raise ConfigError(f"method.ddas_threshold must be null (calibrated) or > 0 (got {thr})")

    def build_protocol(self):
        return MoEAdaptersProtocol(self)

    # ---- set-up ---------------------------------------------------------------------------
    def setup_adapters(self) -> None:
        h = self.hp
        specs = h.get("blocks") or self.backbone.info.get("adapter_blocks")
        if not specs:
            raise ConfigError(f"moe-adapters: backbone {self.backbone.name!r} declares no transformer blocks "
                              "(info adapter_blocks); set method.blocks")
        coef = float(h.balance_coef) if h.balance_loss else 0.0

        def factory(name, block, width):
            return MoEAdapterLayer(width, experts=int(h.experts), bottleneck=int(h.bottleneck), top_k=int(h.top_k),
                                   dropout=float(h.dropout), scale=float(h.scale), freeze_top=int(h.freeze_top),
                                   balance_coef=coef)

        try:
            self.blocks = inject_block_adapters(self.backbone.model, [dict(s) for s in specs], factory)
        except ValueError as e:
            raise ConfigError(f"moe-adapters: {e} in backbone {self.backbone.name!r}") from e
        self.ddas = DDAS(self._feature_dim(), int(h.ddas_code))

    def moe_layers(self) -> list[MoEAdapterLayer]:
        return [b.adapter for b in self.blocks.values()]

    def routing(self, route) -> _Routing:
        return _Routing(self.moe_layers(), route)

    @torch.no_grad()
    def _feature_dim(self) -> int:
        size = int(self.backbone.info.get("image_size") or 224)
        was = self.backbone.training
        self.backbone.eval()
        try:
            return int(self.frozen_features(torch.zeros(1, 3, size, size), is_feature=False).shape[-1])
        finally:
            self.backbone.train(was)

    # ---- DDAS features and choice ---------------------------------------------------------
    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor, is_feature: bool) -> torch.Tensor:
        """The frozen backbone's own image feature: the un-adapted image embedding (every
        router off; before normalisation), from pixels or from cached trunk features."""
        bb = self.backbone
        with self.routing(-1):
            return bb.image_head(x if is_feature else bb.image_trunk(x)).float()

    def choose_routes(self, batch: dict) -> torch.Tensor:
        feats = self.frozen_features(batch["x"], bool(batch.get("is_feature", False)))
        return self.ddas.choose(feats, per_batch=bool(self.hp.ddas_batch))

    # ---- lifecycle ------------------------------------------------------------------------
    def begin_task(self, task: int, data, restoring: bool) -> None:
        for layer in self.moe_layers():
            layer.grow()          # this task's router; earlier routers frozen
        self.ddas.grow()          # this task's autoencoder (trained in end_task)

    def end_task(self, task: int, data, restoring: bool) -> None:
        if restoring:  # counts, frozen experts, autoencoders and thresholds come from the checkpoint
            for layer in self.moe_layers():
                for p in list(layer.gate) + list(layer.noise):
                    p.requires_grad_(False)
            return
        for layer in self.moe_layers():
            self.all_reduce_sum(layer.selection_counts[task:task + 1])   # same experts frozen on every rank
            layer.freeze(layer.selection_counts[task])
        self._fit_ddas(task, data)

    @torch.no_grad()
    def _task_features(self, data, task: int) -> torch.Tensor:
        """Frozen features of the task's whole training set (gathered from every rank)."""
        feats = [self.frozen_features(b["x"], bool(b.get("is_feature", False))) for b in self.task_batches(data, task)]
        local = torch.cat(feats) if feats else torch.zeros(0, self.ddas.dim, device=self.device)
        return gather_with_grad(local)[0].cpu()

    def _fit_ddas(self, task: int, data) -> None:
        h = self.hp
        feats = self._task_features(data, task)
        gen = torch.Generator().manual_seed(int(self.run_cfg.get("seed", 0)) * 1000 + task)
        thr = h.get("ddas_threshold")
        was = self.ddas.training
        self.ddas.train()
        try:
            summary = self.ddas.fit(task, feats, iterations=int(h.ddas_iterations), batch_size=int(h.ddas_batch_size),
                                    lr=float(h.ddas_lr), weight_decay=float(h.ddas_weight_decay),
                                    quantile=float(h.ddas_quantile),
                                    margin=float(h.ddas_margin), threshold=None if thr is None else float(thr),
                                    generator=gen)
        finally:
            self.ddas.train(was)
        self._ddas_summary = getattr(self, "_ddas_summary", {})
        self._ddas_summary[task] = summary

    # ---- loss and facts -------------------------------------------------------------------
    def extra_loss(self, batch: dict, outputs: dict) -> torch.Tensor | None:
        return outputs.get("aux_loss") if self.hp.balance_loss else None

    def display_name(self) -> str:
        return "moe-adapters (batch DDAS)" if self.hp.ddas_batch else self.method_name

    def expert_usage(self) -> dict:
        """Per adapted block: the experts frozen so far and, per task, the top-k experts by
        training selection count."""
        out = {}
        for name, layer in zip(self.blocks, self.moe_layers()):
            counts = layer.selection_counts
            out[name] = {"frozen": [int(i) for i in layer.expert_frozen.nonzero().flatten()],
                         "top_per_task": [[int(i) for i in torch.topk(c, min(layer.top_k, layer.n_experts)).indices]
                                          for c in counts],
                         "distinct_selected": int((counts.sum(0) > 0).sum())}
        return out

    def extra_metrics(self) -> dict:
        h = self.hp
        towers = sorted({"image" if n.startswith("visual.") else "text" for n in self.blocks})
        return {"adapted_blocks": len(self.blocks), "towers": towers, "experts": int(h.experts),
                "bottleneck": int(h.bottleneck), "top_k": int(h.top_k), "freeze_top": int(h.freeze_top),
                "balance_loss": bool(h.balance_loss), "ddas_batch": bool(h.ddas_batch),
                "ddas_features": DDAS_FEATURES, "ddas_feature_dim": self.ddas.dim, "ddas_code": self.ddas.code,
                "ddas_threshold": None if h.get("ddas_threshold") is None else float(h.ddas_threshold),
                "ddas_quantile": float(h.ddas_quantile), "ddas_thresholds": [float(t) for t in self.ddas.thresholds],
                "ddas_fit": {str(k): v for k, v in getattr(self, "_ddas_summary", {}).items()},
                "expert_usage": self.expert_usage()}
