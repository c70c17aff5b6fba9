"""``editcomp distill``: recover a compressed or edited student from its teacher."""

from __future__ import annotations

import click

from editcomp.cli.base import cli, device_option, dtype_option, emit, json_option
from editcomp.defaults import DEFAULT_CALIB, DEFAULT_TEXT


@cli.command("distill")
@click.option("--teacher", required=True, help="Full-precision teacher (for an edited student: "
                                                "the edited fp model).")
@click.option("--student", required=True, help="Student checkpoint (quantized or float).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--loss", type=click.Choice(["fkl", "rkl", "jsd", "skl", "srkl", "kltop", "cakld"]),
              default="fkl", show_default=True, help="Divergence between the next-token "
              "distributions (see editcomp.distill.losses).")
@click.option("--train", "train_set", default="all", show_default=True,
              help="all (weights, on the student's grid via STE), scales, norms or lora; "
                   "scales/norms/lora combine, e.g. scales,norms.")
@click.option("--steps", default=100, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=None,
              help="Learning rate (default: all 1e-5, scales 2e-3, norms 1e-3, lora 2e-4). "
                   "Scales train in log space, so theirs is a relative step.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per training window.")
@click.option("--batch-size", default=1, show_default=True, help="Windows per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per step.")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help=f"Training text, cut into windows (e.g. {DEFAULT_CALIB}).")
@click.option("--generate", default=0, show_default=True,
              help="Also train on N sequences sampled from the teacher (data-free).")
@click.option("--facts", type=click.Path(dir_okay=False), default=None,
              help="Facts JSONL / BMIKE-53 JSON: edit prompts and paraphrases + target, so the "
                   "teacher's edits survive.")
@click.option("--facts-weight", default=1.0, show_default=True,
              help="Weight of the loss on the facts' target tokens.")
@click.option("--alpha", default=0.1, show_default=True, help="skl/srkl skew.")
@click.option("--beta", default=0.5, show_default=True, help="jsd teacher weight.")
@click.option("--top-k", default=1000, show_default=True, help="kltop: teacher's top-k classes.")
@click.option("--gamma", type=float, default=None,
              help="cakld weight of the reverse KL (default: teacher's mean top-1 confidence).")
@click.option("--lora-rank", default=8, show_default=True, help="Rank of the LoRA adapters.")
@click.option("--seed", default=0, show_default=True, help="Data order, sampling, LoRA init.")
@click.option("--save-every", default=0, show_default=True,
              help="Write the trainer state every N steps (0: never).")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Where the trainer state goes (default: OUT.state).")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue from a trainer state of the same run.")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=DEFAULT_TEXT,
              show_default=True, help="Text for the before/after perplexity.")
@click.option("--eval-windows", default=4, show_default=True,
              help="Windows of --eval-seq-len tokens for the before/after perplexity (0: skip).")
@click.option("--eval-seq-len", default=2048, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
@dtype_option
@json_option
def distill_cmd(teacher, student, out, loss, train_set, steps, lr, seq_len, batch_size,
                grad_accum, text, generate, facts, facts_weight, alpha, beta, top_k, gamma,
                lora_rank, seed, save_every, state_dir, resume, eval_text, eval_windows,
                eval_seq_len, force, device, dtype, as_json):
    """Distill --student towards --teacher and write the student, in its own format, to --out.

    A quantized student stays on its quantization grid (integer codes and scales); lm_head and
    embeddings stay frozen. The report gives perplexity before and after and the loss curve.

    \b
    Example:
      editcomp distill --teacher smollm2-135m --student out/w3 --out out/w3-distilled \\
          --loss cakld --train scales,norms --text ../shared/data/wikitext-2/valid.txt
    """
    from pathlib import Path

    from editcomp.distill import DistillConfig
    from editcomp.jobs import distill_job

    state_dir = state_dir or (str(Path(out)) + ".state" if save_every else None)
    config = DistillConfig(loss=loss, train=train_set, steps=steps, lr=lr, batch_size=batch_size,
                           seq_len=seq_len, grad_accum=grad_accum, facts_weight=facts_weight,
                           alpha=alpha, beta=beta, k=top_k, gamma=gamma, lora_rank=lora_rank,
                           seed=seed, save_every=save_every, checkpoint_dir=state_dir,
                           resume=resume)
    result = distill_job(student, config, out, teacher=teacher, text=text, generate=generate,
                         facts=facts, eval_text=eval_text, eval_windows=eval_windows,
                         eval_seq_len=eval_seq_len, force=force, device=device, dtype=dtype)

    def human(r):
        click.echo(f"wrote {r['out']}  ({r['loss']}, train {r['train']}, {r['steps']} steps, "
                   f"{r['trainable_params']} trainable)")
        for name in ("ppl_teacher", "ppl_before", "ppl_after", "loss_first", "loss_last",
                     "seconds"):
            if r.get(name) is not None:
                click.echo(f"  {name:<16}{r[name]:>12.4f}")
    emit(result, as_json, human)
