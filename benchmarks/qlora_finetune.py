"""QLoRA on qlab: LoRA adapters fine-tuned on a frozen nf4 SmolLM2 loaded with ``from_pretrained``.

SmolLM2-135M is quantized on the fly (``QlabConfig("nf4", 4, 64)``), LoRA adapters (r=8, alpha=16) go
on every attention and MLP projection through :func:`qlab.peft.get_peft_model`, and AdamW trains them
for ``--steps`` steps of ``--batch`` windows of 128 tokens from the calibration plays
(:func:`qlab.text.calibration_batches`), on ``--threads`` CPU threads. It prints held-out perplexity
(the evaluation plays, ``--eval-windows`` windows of 128 tokens, the same windows every time) of the
quantized model without adapters, with the trained adapters, and after ``merge_and_unload`` to float
and back onto the nf4 grid; the training time; and trainable and total bytes.

    python benchmarks/qlora_finetune.py [--steps 50] [--batch 4] [--threads 2] [--lr 1e-3]

The perplexities are paired (same windows, same model): the difference is the adapters' doing.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlab
import qlab.peft
from qlab.cache import require
from qlab.evaluate import perplexity
from qlab.hf import QlabConfig
from qlab.text import calibration_batches

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ_LEN = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    folder = str(require("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QlabConfig("nf4", 4, 64))

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, seq_len=SEQ_LEN, max_windows=args.eval_windows, progress=False)

    before = ppl(model)
    print(f"held-out perplexity, nf4 without adapters: {before:.2f}", flush=True)
    peft_model = qlab.peft.get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    )
    trainable, total = qlab.peft.trainable_and_total_bytes(peft_model)
    data = calibration_batches(tok, n_samples=args.steps * args.batch, seq_len=SEQ_LEN, seed=0)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = data[step * args.batch : (step + 1) * args.batch]
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.3f}", flush=True)
    train_s = time.perf_counter() - t0
    peft_model.eval()
    after = ppl(peft_model)
    print(f"held-out perplexity, nf4 + LoRA: {after:.2f} (training {train_s:.0f} s)", flush=True)

    state = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    merged_float = ppl(qlab.peft.merge_and_unload(peft_model, to="float"))
    # a fresh quantized model with the same adapters, merged back onto the nf4 grid
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QlabConfig("nf4", 4, 64))
    again = qlab.peft.get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    )
    again.load_state_dict(state, strict=False)
    merged_q = qlab.peft.merge_and_unload(again, to="quantized")
    n_quant = len(qlab.driver.quantized_layers(merged_q))
    merged_quant = ppl(merged_q)

    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"SmolLM2-135M nf4 g64 (on the fly), LoRA r=8 on {', '.join(TARGETS)}")
    print(
        f"training: {args.steps} steps x {args.batch} x {SEQ_LEN} tokens, {args.threads} threads, "
        f"{train_s:.0f} s ({train_s / args.steps:.2f} s/step); loss {first:.3f} -> {last:.3f} "
        "(mean of the first and last 5 steps)"
    )
    print(
        f"trainable {trainable / 2**20:.2f} MiB of {total / 2**20:.1f} MiB total "
        f"({100 * trainable / total:.2f}%)"
    )
    print(f"held-out perplexity ({args.eval_windows} x {SEQ_LEN} tokens of the evaluation plays):")
    print(f"  nf4, no adapters          {before:8.2f}")
    print(f"  nf4 + LoRA                {after:8.2f}")
    print(f"  merged to float           {merged_float:8.2f}")
    print(f"  merged onto the nf4 grid  {merged_quant:8.2f}  ({n_quant} quantized layers)")


if __name__ == "__main__":
    main()
