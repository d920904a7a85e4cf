"""`dydit-bench memory`: what one rank needs to train a released pipeline at its full depth, before launching.

Model states (parameters, gradients, optimizer states) come from DeepSpeed's own estimators
(`estimate_zero2/3_model_states_mem_needs`), which assume mixed precision: 16-bit parameters, fp32
master weights and Adam (train with model.dtype bf16). Their per-GPU total is split the way their
comments count it; frozen weights (LoRA / TD-LoRA: everything but the adapters and routers) are
stored in bf16, replicated under ZeRO-2 and partitioned under ZeRO-3. Activations are measured, not
modelled (`memory_measure`). The frozen text encoders (bf16, as the trainer holds them) and VAE
(fp32) are whole on every rank. Not counted: the CUDA context, DeepSpeed's communication buckets and
allocator fragmentation. GB here are 2^30 bytes, as DeepSpeed prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from dydit_scale.console import quiet_third_party
from dydit_scale.models.registry import all_replicas

__all__ = ["add_arguments", "model_states", "run"]

GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replica", required=True, choices=sorted(all_replicas()), help="released pipeline")
    parser.add_argument("--world", type=int, default=8, help="ranks (GPUs) in the run")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="ranks per node (DeepSpeed's CPU figures are per node)")
    parser.add_argument("--zero", type=int, choices=[2, 3], default=3, help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", action="store_true",
                        help="optimizer states in CPU memory (train.offload_optimizer)")
    parser.add_argument("--offload-params", action="store_true",
                        help="ZeRO-3 parameters in CPU memory too (train.offload_params; needs --offload)")
    parser.add_argument("--lora", choices=["none", "lora", "td_lora"], default="none",
                        help="none: full fine-tuning; lora / td_lora: adapters + routers trained, base frozen in bf16")
    parser.add_argument("--resolution", type=int, help="image side in pixels; default the released one")
    parser.add_argument("--batch", type=int, default=1, help="samples per rank per micro-step")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the activation measure")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory per rank, GB (2^30 bytes)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="where activations are measured; default cuda if available")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _check(args: argparse.Namespace) -> int:
    """One-line errors naming the flag; returns the node count."""
    for flag in ("world", "gpus_per_node", "batch", "threads"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')}: expected an integer >= 1, got {getattr(args, flag)}")
    if args.offload_params and (args.zero != 3 or not args.offload):
        raise SystemExit("--offload-params: needs --zero 3 and --offload")
    per_node = min(args.gpus_per_node, args.world)
    if args.world % per_node:
        raise SystemExit(f"--world: {args.world} ranks do not fill nodes of {per_node} (--gpus-per-node)")
    return args.world // per_node


def model_states(trainable: int, frozen: int, largest: int, *, world: int, nodes: int, zero: int, offload: bool,
                 offload_params: bool) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer states, DeepSpeed's per-GPU total of the
    trainable part (`deepspeed_gpu`), and its CPU bytes per node (`deepspeed_cpu_per_node`)."""
    per_node = world // nodes
    if zero == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, per_node, nodes, cpu_offload=offload)
        # 2 = 16-bit parameters (replicated); 18 / world = 2 + 4 gradients (16-bit, fp32)
        # + 4 + 8 fp32 master weights and Adam moments
        states = dict(parameters=2 * trainable + 2 * frozen, gradients=0 if offload else 6 * trainable / world,
                      optimizer=0 if offload else 12 * trainable / world)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, layer = estimate_zero3_model_states_mem_needs(trainable, largest, per_node, nodes,
                                                                cpu_offload=offload, cpu_offload_params=offload_params)
        # layer = 4 · largest layer: its gathered 16-bit parameters and gradients; 18 / world as ZeRO-2,
        # the 16-bit parameters partitioned instead of 16-bit gradients
        partition = 0 if offload_params else 2 * (trainable + frozen) / world
        states = dict(parameters=layer / 2 + partition, gradients=layer / 2 + (0 if offload else 4 * trainable / world),
                      optimizer=0 if offload else 12 * trainable / world)
    return states | dict(deepspeed_gpu=gpu, deepspeed_cpu_per_node=cpu)


def _default_resolution(replica: Any, config: Any) -> int:
    """The released sample size in pixels (the VAE's when the transformer has none, as FLUX)."""
    from dydit_scale.models.family import vae_scale_factor

    sample = config.get("sample_size")
    return sample * vae_scale_factor(replica.vae) if sample else replica.vae["sample_size"]


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Count, measure and estimate (see module doc); everything in the JSON is in bytes or parameters."""
    import torch

    from dydit_scale.bench.memory_measure import frozen_components, measure_replica, released_parameters
    from dydit_scale.config import LoraConfig
    from dydit_scale.models.registry import get_replica

    nodes = _check(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    family, replica = get_replica(args.replica)
    stock, base = released_parameters(family, replica)
    resolution = args.resolution or _default_resolution(replica, stock.config)
    if resolution % 16:
        raise SystemExit(f"--resolution: expected a multiple of 16 pixels (latent cells × patch), got {resolution}")
    text_tokens = family.default_token_shape(stock.config).text_tokens
    frames = stock.config.get("video_length") or 1
    shape = family.token_shape(stock.config, resolution=(resolution, resolution), vae_config=replica.vae,
                               text_tokens=text_tokens, frames=frames)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    measured = measure_replica(family, replica, lora=LoraConfig(kind=args.lora), resolution=resolution,
                               text_tokens=text_tokens, batch=args.batch,
                               dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, device=device)
    total = base + sum(b.depth * b.added for b in measured.blocks)
    trainable = measured.other_trainable + sum(b.depth * b.trainable for b in measured.blocks)
    states = model_states(trainable, total - trainable, measured.largest_layer, world=args.world, nodes=nodes,
                          zero=args.zero, offload=args.offload, offload_params=args.offload_params)
    activations = {"none": measured.activations(False), "checkpointing": measured.activations(True)}
    frozen = frozen_components(replica)
    frozen_bytes = sum((4 if name == "vae" else 2) * count for name, count in frozen.items())
    kept = states["parameters"] + states["gradients"] + states["optimizer"] + frozen_bytes
    per_rank = {mode: kept + value for mode, value in activations.items()}
    return dict(replica=args.replica, source=replica.source, lora=args.lora, zero=args.zero, world=args.world,
                nodes=nodes, offload=args.offload, offload_params=args.offload_params, resolution=resolution,
                frames=frames, image_tokens=shape.image_tokens, text_tokens=shape.text_tokens, batch=args.batch,
                activation_dtype=args.dtype, device=device.type,
                parameters=dict(total=total, released_transformer=base, added_by_dynamic_and_adapters=total - base,
                                trainable=trainable, largest_layer=measured.largest_layer),
                blocks=[dataclasses.asdict(b) for b in measured.blocks],
                states=states, frozen_components=dict(parameters=frozen, bytes=frozen_bytes),
                activations=activations, total=per_rank, gpu_bytes=args.gpu_gb * GIB,
                fits={mode: value <= args.gpu_gb * GIB for mode, value in per_rank.items()},
                one_block_per_stack=dict(saved=measured.measured_model(),
                                         cuda_forward_peak=measured.cuda_forward_peak))


def run(args: argparse.Namespace) -> int:
    quiet_third_party(verbose=False)
    result = estimate(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    params, states = result["parameters"], result["states"]
    mode = "full fine-tuning" if result["lora"] == "none" else f"{result['lora']} (base frozen, bf16)"
    offload = "optimizer + parameters" if result["offload_params"] else "optimizer" if result["offload"] else "none"
    frames = f" × {result['frames']} frames" if result["frames"] > 1 else ""
    text = f" + {result['text_tokens']} text" if result["text_tokens"] else ""
    print(f"{result['replica']} ({result['source']}), {mode}: ZeRO-{result['zero']}, {result['world']} ranks on "
          f"{result['nodes']} node(s), offload {offload}")
    print(f"{result['resolution']}²{frames}: {result['image_tokens']} image{text} tokens, "
          f"batch {result['batch']}; activations measured in {result['activation_dtype']} on {result['device']}")
    print(f"parameters {params['total'] / 1e9:.2f} B ({params['released_transformer'] / 1e9:.2f} B released + "
          f"{params['added_by_dynamic_and_adapters'] / 1e6:.0f} M routers/adapters), "
          f"trainable {params['trainable'] / 1e9:.3f} B, largest layer {params['largest_layer'] / 1e6:.1f} M")
    print(f"{'per rank, GB':<22}{'no checkpointing':>18}{'checkpointing':>16}")
    for label, key in (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer states", "optimizer")):
        print(f"{label:<22}{states[key] / GIB:>18.2f}{states[key] / GIB:>16.2f}")
    frozen = result["frozen_components"]["bytes"] / GIB
    print(f"{'frozen encoders + VAE':<22}{frozen:>18.2f}{frozen:>16.2f}")
    acts, totals, fits = result["activations"], result["total"], result["fits"]
    print(f"{'activations':<22}{acts['none'] / GIB:>18.2f}{acts['checkpointing'] / GIB:>16.2f}")
    print(f"{'total':<22}{totals['none'] / GIB:>18.2f}{totals['checkpointing'] / GIB:>16.2f}")
    verdict = {True: "yes", False: "NO"}
    print(f"{f'fits {args.gpu_gb:g} GB':<22}{verdict[fits['none']]:>18}{verdict[fits['checkpointing']]:>16}")
    print(f"DeepSpeed estimate of the trainable states: {states['deepspeed_gpu'] / GIB:.2f} GB per GPU, "
          f"{states['deepspeed_cpu_per_node'] / GIB:.1f} GB CPU per node")
    check = result["one_block_per_stack"]
    if check["cuda_forward_peak"] is not None:
        print(f"CUDA cross-check, one block per stack: saved tensors {check['saved'] / GIB:.2f} GB, forward peak "
              f"(max_memory_allocated) {check['cuda_forward_peak'] / GIB:.2f} GB")
    print("not counted: CUDA context, DeepSpeed buckets, fragmentation")
    return 0
