"""The baseline every optimisation is measured and tested against: the full prompt rendered and
`model.generate` called once per judgment, as the judges' model cards do."""

from __future__ import annotations

from typing import Any

import torch

from soda_guard.chat_tokens import encode_chat
from soda_guard.engine.decode import eos_ids
from soda_guard.generation import GenerationRequest, GenerationResult
from soda_guard.scoring import score_generation


@torch.inference_mode()
def naive_generate(model: Any, tokenizer: Any, request: GenerationRequest, *, ignore_eos: bool = False) -> GenerationResult:
    """`ignore_eos` forces exactly `max_new_tokens` tokens (min_new_tokens), for benchmarks."""
    device = next(model.parameters()).device
    prompt_ids = encode_chat(tokenizer, request.messages)
    input_ids = torch.tensor([prompt_ids], device=device)
    eos = eos_ids(model, tokenizer)
    output: Any = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=request.max_new_tokens,
        min_new_tokens=request.max_new_tokens if ignore_eos else None,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        output_logits=request.score is not None,
        return_dict_in_generate=True,
    )
    generated = output.sequences[0, len(prompt_ids) :].tolist()
    while generated and generated[-1] in eos and not ignore_eos:
        generated.pop()
    score = None
    if request.score is not None:
        score = score_generation(tokenizer, generated, [step[0] for step in output.logits], request.score)
    return GenerationResult(
        text=tokenizer.decode(generated, skip_special_tokens=True),
        score=score,
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(generated),
        score_source="logits" if score is not None else None,
    )
