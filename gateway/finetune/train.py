"""The trainer: LoRA on a causal language model, run as a process of its own (``python -m gateway.finetune.train
SPEC``), so that the gateway's event loop never waits for it and a cancel is a signal.

SPEC is a JSON file: ``base`` (the base model's folder, Hugging Face's layout), ``train`` and ``validation`` (chat
JSONL files, checked already), ``output`` (where the adapter goes), ``checkpoints`` (a folder for one adapter every
``checkpoint_every`` steps), ``hyperparameters`` (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``),
``seed``, ``lora`` (``r``, ``alpha``, ``dropout``), ``resume`` (``path`` of a checkpoint of this job and its
``step``: its adapter's weights are loaded and the steps before it skipped; the optimizer starts afresh). On a CPU the process lowers its priority and uses half the
cores at most: serving comes first. Each conversation is written as ``role: text`` lines ending in the
tokenizer's end-of-sequence token, and the loss is taken on the assistant turns only (those of weight 1). On CUDA
the base model is loaded in 4 bits (QLoRA, with bitsandbytes) when that library is installed; on a CPU in full
precision.

Progress goes to stdout, one JSON object a line: ``{"event": "step", "step", "total_steps", "loss", "epoch"}``,
``{"event": "checkpoint", "step", "path", "loss", "valid_loss"}``, ``{"event": "done", "trained_tokens",
"steps", "valid_loss"}``. A failure exits non-zero with its reason on the last line of stderr.

Needs the ``train`` extra: ``pip install -e .[train]`` (torch, transformers, peft, safetensors).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

LEARNING_RATE = 2e-4  # what a multiplier of 1 means
IGNORED = -100  # labels PyTorch's cross-entropy leaves out


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def encode(tokenizer, messages: list[dict], limit: int) -> tuple[list[int], list[int]]:
    """A conversation's token ids, and its labels: the assistant's own tokens, the rest ignored."""
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        if message.get("tool_calls"):
            content += json.dumps(message["tool_calls"])
        piece = tokenizer(f"{message['role']}: {content}\n", add_special_tokens=False)["input_ids"]
        learned = message["role"] == "assistant" and message.get("weight", 1) == 1
        ids += piece
        labels += piece if learned else [IGNORED] * len(piece)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids[:limit], labels[:limit]


def batches(examples: list, size: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), size):
        yield [examples[i] for i in order[start:start + size]]


def collate(torch, batch: list, pad: int):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORED, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (tokens, learned) in enumerate(batch):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(learned)] = torch.tensor(learned)
        mask[row, :len(tokens)] = 1
    return ids, labels, mask


def run(spec: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # Training on the gateway's own cores: at a lower priority than serving, on half of them at most, so that
        # requests keep their latency while a job runs (measured by `gateway bench fine-tuning`).
        os.nice(10)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    seed = int(spec.get("seed") or 0)
    random.seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    hyper = spec["hyperparameters"]
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    options = {}
    if torch.cuda.is_available():
        import importlib.util

        from transformers import BitsAndBytesConfig

        options["device_map"] = "auto"
        if importlib.util.find_spec("bitsandbytes") is not None:  # QLoRA: the base in 4 bits
            options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["base"], **options)
    limit = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and "lm_head" not in name}
    targets = [name for name in ("q_proj", "v_proj") if name in names] or sorted(names)
    lora = spec.get("lora") or {}
    model = get_peft_model(model, LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                                             lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets,
                                             task_type="CAUSAL_LM"))
    resume = spec.get("resume") or {}
    done_steps = int(resume.get("step") or 0)
    if resume:  # a checkpoint of this job: its adapter's weights, and the steps it had made
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(Path(resume["path"]) / "adapter_model.safetensors")))
    read = lambda path: [json.loads(line)["messages"] for line in Path(path).read_text().splitlines()  # noqa: E731
                         if line.strip()]
    train = [encode(tokenizer, messages, limit) for messages in read(spec["train"])]
    valid = [encode(tokenizer, messages, limit) for messages in read(spec["validation"])] if spec.get(
        "validation") else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    epochs, size = int(hyper["n_epochs"]), int(hyper["batch_size"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=LEARNING_RATE * float(hyper["learning_rate_multiplier"]))
    total = epochs * math.ceil(len(train) / size)
    every = int(spec.get("checkpoint_every") or max(1, total // 3))
    device = next(model.parameters()).device
    step = 0
    trained = 0
    model.train()
    for epoch in range(epochs):
        for batch in batches(train, size, rng):
            if step < done_steps:  # made before the restart: the same batches, in the same order (same seed)
                step += 1
                continue
            ids, labels, mask = (t.to(device) for t in collate(torch, batch, pad))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            trained += int(mask.sum())
            say(event="step", step=step, total_steps=total, epoch=epoch + 1, loss=round(float(loss), 5))
            if step % every == 0 and step < total:
                folder = Path(spec["checkpoints"]) / f"step-{step}"
                model.save_pretrained(folder)
                say(event="checkpoint", step=step, path=str(folder), loss=round(float(loss), 5),
                    valid_loss=evaluate(torch, model, valid, pad, device))
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(spec["output"])
    say(event="done", steps=step, trained_tokens=trained, valid_loss=evaluate(torch, model, valid, pad, device))


def evaluate(torch, model, examples: list, pad: int, device) -> float | None:
    if not examples:
        return None
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            ids, labels, mask = (t.to(device) for t in collate(torch, examples[start:start + 8], pad))
            losses.append(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss))
    model.train()
    return round(sum(losses) / len(losses), 5)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    started = time.monotonic()
    try:
        run(spec)
    except ImportError as exc:
        print(f"the trainer needs the train extra (pip install -e .[train]): {exc}", file=sys.stderr)
        sys.exit(3)
    except Exception as exc:  # the reason is the job's error
        print(f"{type(exc).__name__}: {exc}"[:1000].replace("\n", " "), file=sys.stderr)
        sys.exit(1)
    print(f"trained in {time.monotonic() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
