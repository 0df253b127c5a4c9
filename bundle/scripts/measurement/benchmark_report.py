"""The plain-text report of the benchmark (:func:`scripts.measurement.benchmark.run_benchmark`'s result)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["format_benchmark_table"]


def encoder_rows(result: dict[str, Any], row: Callable[[str, str], str]) -> list[str]:
    """Part 3's rows: the fast encoder against segment-anything's, bf16, the precompute batch's memory."""
    encoder, memory = result.get("encoder"), result.get("encoder_memory")
    if encoder is None:
        return [row("3. the image encoder", "skipped")]
    per_frame = encoder["s_per_frame"]
    lines = [
        row(
            f"3. image encoder ({encoder['sam_variant']}), s/frame: segment-anything fp32",
            f"{per_frame['segment_anything_fp32']:.2f}",
        ),
        row(
            "   fast forward fp32 / bf16 autocast",
            f"{per_frame['fast_fp32']:.2f} / {per_frame['fast_bf16_autocast']:.2f}",
        ),
        row(
            "   speed-up fp32 / bf16 (same process)", f"{encoder['speedup_fp32']:.2f}x / {encoder['speedup_bf16']:.2f}x"
        ),
        row("   max |fast fp32 - segment-anything| / max |embedding|", f"{encoder['max_rel_diff_fp32']:.1e}"),
        row(
            "   max |decoder logits from bf16 - from fp32 embeddings|",
            f"{encoder['bf16_decoder_logits_max_abs_diff']:.2e}",
        ),
    ]
    if memory is not None:
        lines.append(
            row(
                f"   {memory['sam_variant']} precompute batch of {memory['frames']}: peak RSS GiB; s/frame",
                f"{memory['peak_rss_gib']:.2f}; {memory['s_per_frame']:.1f}",
            )
        )
    return lines


def format_benchmark_table(result: dict[str, Any]) -> str:
    """A plain-text report of :func:`run_benchmark`'s result."""
    s = result["settings"]
    d, h, w = s["embedding_shape"]
    paths = result["paths"]

    def row(label: str, value: str) -> str:
        return f"  {label:<62}{value:>14}"

    def pair(part: str, mallopt_run: str) -> str:
        rate = "samples_per_s" if part == "train" else "masks_per_s"
        never_trim_run = mallopt_run.replace("equal_terms", "never_trim")
        return f"{paths[mallopt_run][part][rate]:.2f} / {paths[never_trim_run][part][rate]:.2f}"

    def speedups(part: str) -> str:
        return f"{result[part + '_speedup_mallopt']:.2f}x / {result[part + '_speedup_never_trim']:.2f}x"

    def best(part: str) -> str:
        chosen = result["equal_terms_allocator"][part]
        return f"bundle {chosen['bundle']}, original {chosen['original']}"

    lines = [
        "SurgicalSAM benchmark",
        f"  batch {s['batch_size']}, C={s['num_classes']}, n={s['num_tokens']}, frame {s['frame_size'][0]}x"
        f"{s['frame_size'][1]}, embeddings {d}x{h}x{w}, device {s['device']} ({s['device_name']}), "
        f"torch {result['torch_version']} with {result['threads']} thread(s), {s['steps']} timed step(s) after a "
        f"warm-up{' (--quick)' if s['quick'] else ''}",
        f"  network: SurgicalSAM on SAM {s['sam_variant']} sizes, random weights; parts 1-2 on cached-embedding-"
        f"sized inputs" + (" (the prompt side is identical for vit_h)" if h == 64 else ""),
        f"  process settings of the bundle: {result['process_settings']['allocator']}",
        f"  the bundle's training step in slices of {s.get('micro_batch_size') or s['batch_size']} samples "
        f"(micro_batch_size)",
        "",
        row("measurement", "value"),
        f"  {'-' * 76}",
        row("1. training samples/s, this bundle", f"{result['train_samples_per_s']:.2f}"),
        row("   the original, out of the box (plain environment)", f"{result['train_samples_per_s_original']:.2f}"),
        row("   the original, bundle's mallopt / never-trimming heap", pair("train", "original_equal_terms")),
        row("   this bundle, never-trimming heap", f"{paths['bundle_never_trim']['train']['samples_per_s']:.2f}"),
        row("   speed-up over the original out of the box", f"{result['train_speedup']:.2f}x"),
        row(
            f"   speed-up over the original on equal terms ({best('train')})",
            f"{result['train_speedup_equal_terms']:.2f}x",
        ),
        row("   speed-up, both with mallopt / both never-trimming", speedups("train")),
        row("   |loss - original's loss| at the first step", f"{result['train_loss_abs_diff']:.2e}"),
        row("   max |parameter - original's| after the first step", f"{result['train_param_max_abs_diff']:.2e}"),
        row("2. inference from cached embeddings, all C prompted, masks/s", f"{result['infer_masks_per_s']:.2f}"),
        row("   the original, out of the box", f"{result['infer_masks_per_s_original']:.2f}"),
        row(
            "   the original, bundle's mallopt / never-trimming heap", pair("inference_cached", "original_equal_terms")
        ),
        row(
            "   this bundle, never-trimming heap",
            f"{paths['bundle_never_trim']['inference_cached']['masks_per_s']:.2f}",
        ),
        row("   speed-up over the original out of the box", f"{result['infer_speedup']:.2f}x"),
        row(
            f"   speed-up over the original on equal terms ({best('infer')})",
            f"{result['infer_speedup_equal_terms']:.2f}x",
        ),
        row("   speed-up, both with mallopt / both never-trimming", speedups("infer")),
    ]
    if "train_samples_per_s_amp" in result:
        lines += [
            row("   bf16 autocast: training samples/s", f"{result['train_samples_per_s_amp']:.2f}"),
            row("   bf16 autocast: inference masks/s", f"{result['infer_masks_per_s_amp']:.2f}"),
            row(
                "   bf16 autocast: |loss - fp32 original's| at the first step",
                f"{result['train_loss_abs_diff_amp']:.2e}",
            ),
        ]
    lines += encoder_rows(result, row)
    lines.append(
        row(
            f"   data path: a batch of {s['batch_size']} read from the cache (s; share of a step)",
            f"{result['data_batch_read_s']:.3f}; {100 * result['data_batch_read_share_of_step']:.1f}%",
        )
    )
    lines.append(row("4. peak RSS of the training step, this bundle (GiB)", f"{result['train_peak_rss_gib']:.2f}"))
    lines.append(
        row(
            "   the original out of the box / on equal terms (GiB)",
            f"{result['train_peak_rss_gib_original']:.2f} / {result['train_peak_rss_gib_original_equal_terms']:.2f}",
        )
    )
    lines.append(
        row(
            "   the bundle / the original with a never-trimming heap (GiB)",
            f"{result['train_peak_rss_gib_never_trim']:.2f} / {result['train_peak_rss_gib_original_never_trim']:.2f}",
        )
    )
    cache = result["cache"]
    lines += [
        row("5. cache per frame: embedding .npy (float16, bytes)", f"{cache['embedding_npy_bytes']:,d}"),
        row("   of which header (bytes)", f"{cache['embedding_npy_bytes'] - cache['embedding_raw_bytes']:,d}"),
        row("   label PNG of a demo-like label map (bytes)", f"{cache['label_png_bytes']:,d}"),
    ]
    if "cache_entry_bytes" in result:
        lines += [
            row("   cache entry, compressed (bytes)", f"{result['cache_entry_bytes']:,d}"),
            row("   cache entry, float16 (bytes)", f"{result['cache_entry_bytes_float16']:,d}"),
            row("   max |decoder logits, compressed - float16 entry|", f"{result['cache_logits_max_abs_diff']:.2e}"),
        ]
    else:
        lines.append(row("   cache entry measure", "not run"))
    distill = result.get("distill")
    if distill is None:
        lines.append(row("6. Distillation-SAM training", "skipped"))
    else:
        h, w = distill["frame_size"]
        lines += [
            f"  6. Distillation-SAM on SAM {distill['sam_variant']} (taps {distill['taps']}, "
            f"{distill['trainable_parameters']:,d} trainable), batch {distill['batch_size']}, frame {h}x{w}",
            row(
                "   training from raw frames (encoder each step), samples/s",
                f"{distill['raw_frames']['samples_per_s']:.3f}",
            ),
            row("   training from the tap cache, samples/s", f"{distill['tap_cache']['samples_per_s']:.3f}"),
            row("   speed-up of the tap cache (reads not counted)", f"{distill['cache_speedup']:.2f}x"),
            row(
                "   tap cache read per entry, float16 .npy -> float32 (s)",
                f"{distill['cache']['read_s_per_entry']:.4f}",
            ),
            row("   tap cache per (frame, version): arrays (bytes)", f"{distill['cache']['array_bytes_per_entry']:,d}"),
            row("   the two .npy files with headers (bytes)", f"{distill['cache']['npy_bytes_per_entry']:,d}"),
            row("   + the augmented frame PNG and label PNG (at most H*W*4 bytes)", f"{h * w * 4:,d}"),
        ]
    lines.append(f"  ({result['seconds']:.0f} s in all; paths: {', '.join(paths)})")
    return "\n".join(lines)
