"""DyDiT mechanics, torch only: routers, masked execution, magnitude ranking, analytic FLOPs.

The method is DyDiT, "Dynamic Diffusion Transformer" (Zhao et al., ICLR 2025, arXiv 2410.03456):
a pre-trained diffusion transformer is fine-tuned so that its width follows the timestep and its
MLPs skip easy tokens. Equation numbers below are the paper's.

Timestep-wise Dynamic Width (TDW). An attention block is a sum over its H heads (Eq. (1)); the MLP's
D hidden channels are split into G contiguous groups, making it a sum over groups (Eq. (2)). Per
block, two routers read the pure timestep embedding e_t (no text, class or resolution signal) and
give one probability per head and per group (Eq. (3)); 0.5 thresholds them into masks. In training
the masks are Gumbel-sigmoid samples with a straight-through gradient (hard 0/1 forward, σ'/τ
backward), multiplied into the attention output before W_O and the fc1 output before the
activation, so shapes never change.
Head 0 and group 0 are always on. Router module: `dynamic/routers.py` (`TimestepRouter`,
`gumbel_sigmoid`); the masks are applied by `dynamic/masks.py`.

Spatial-wise Dynamic Token (SDT). Before each MLP a token router scores every token of the residual
stream (Eq. (5)); a masked token bypasses the MLP (its update is multiplied by 0), while attention
always sees all tokens. Modules: `TokenRouter` (DiT/PixArt/Latte) and `ConditionedTokenRouter`
(FLUX, scored with timestep and pooled text) in `dynamic/routers.py`. Token routers depend on the
content, so they stay live at inference.

FLOPs-constrained loss. Each router keeps its last mask, from which `dynamic/flops.py` counts the
per-sample MACs of attention and MLPs analytically and divides by the static count: r_b. The
loss is L = L_diffusion + w·(mean_b r_b − λ)² (Eq. (6), paper weight w = 1; we default to the
official code's w = 2, a λ warm-up from 1, and a mean over the global batch): `dynamic/budget.py`.
The paper's complete-model warm-up term (Sec. 3.4) is `complete_rows` in `dynamic/routers.py`: the
same network run with all masks forced to 1 on a second copy of the batch.

Magnitude ranking. Before fine-tuning, heads and MLP channels are ranked by weight magnitude and
permuted so that unit 0, the one kept on, is the most important (Sec. 3.4); the permutation moves
the same rows/columns in every producer and consumer, so the network computes the same function.
Scoring and permutation: `dynamic/importance.py` (applied per block by `make_dynamic`).

Frozen router schedule. TDW masks depend on t only, so after training they are computed once per
sampler step (Sec. 3.2, "pre-compute the masks offline") and stored as a `RouterSchedule`
(`dynamic/schedule.py`): bool masks [T, units] per timestep router, keyed by the exact `timestep`
values the pipeline passes to the transformer (sampler-, step-count- and, for FLUX,
resolution-specific); an unknown key is an error, never a nearest neighbour. Export:
`dydit_scale.infer.export`, time keys: `dydit_scale.infer.keys`.

Fast path. Training runs the masked (dense) computation; inference runs Eq. (4): only the active
heads and groups are computed, by slicing Q/K/V/fc1 rows and W_O/fc2 columns, and the tokens the
token router keeps are gathered into the MLP and scattered back (Sec. 3.3). Every sample of a batch
shares the step's TDW masks, so batching is unchanged. Module: `dydit_scale.infer.fast`
(`apply_schedule`), blocks in `dydit_scale.infer.fast_blocks`, weight slicing in
`dydit_scale.infer.sliced`.
"""
