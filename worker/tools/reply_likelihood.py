"""``python -m worker.tools.reply_likelihood``: do replies stay coherent under a quantisation mode?

Scores a fixed set of reference replies (short, plain, zh and en, written for this check) under the loaded model:
the mean log-likelihood per reply token given the reply prompt the worker builds. A mode that damages the model
makes good replies less likely, so its figure drops below float32's; equal figures mean the model still prefers
the same text. Compare modes by running it under each ``ALLINONE_QUANTIZE`` / ``ALLINONE_DTYPE``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

REFERENCES: tuple[tuple[str, str], ...] = (
    ("你好，你是谁？", "你好！我是一个人工智能助手，可以回答问题、提供建议，也可以陪你聊天。"),
    ("今天天气不错，有什么推荐的活动吗？",
     "天气好的时候很适合出去走走，比如去公园散步、骑自行车，或者和朋友一起野餐。"),
    ("这家酒店的服务太差了，我很生气。",
     "听到你的经历我很抱歉。你可以把具体情况告诉酒店的经理，要求他们给出解释和补偿。"),
    ("推荐一本好看的小说吧。", "可以试试《活着》，这是余华写的一本小说，故事感人，语言朴实，很多人读了都很喜欢。"),
    ("Hello! Who are you?",
     "Hi! I am an AI assistant. I can answer questions, give suggestions and help you with writing."),
    ("The movie was boring and far too long.", "Sorry it was a disappointment. A long film with a thin story can feel "
     "endless; maybe a shorter comedy would suit you better next time."),
    ("Can you give me a tip for learning English?", "Read a little every day, and say new words out loud. Short, "
     "regular practice works better than long sessions once a week."),
    ("What is the capital of France?", "The capital of France is Paris."),
)


def reply_log_likelihood(engine: Any, pairs: tuple[tuple[str, str], ...] = REFERENCES) -> dict[str, float]:
    """Mean log-likelihood per token of each reference reply after its prompt, and over all of them."""
    import torch

    total, tokens, per = 0.0, 0, []
    for question, answer in pairs:
        prompt, _ = engine.reply_prompt_ids([], question)
        reply = engine.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt, reply], dim=1)
        with torch.inference_mode():
            logits = engine.model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, reply[0][:, None]).sum().item()
        total, tokens = total + lp, tokens + reply.shape[1]
        per.append(lp / reply.shape[1])
    return {"mean_log_likelihood_per_token": total / tokens, "perplexity": math.exp(-total / tokens),
            "per_reply": per}


def main(argv: list[str] | None = None) -> int:
    from worker.engine import Engine
    from worker.settings import Settings

    ap = argparse.ArgumentParser(prog="python -m worker.tools.reply_likelihood", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="overrides ALLINONE_MODEL")
    args = ap.parse_args(argv)
    settings = Settings(**({"model": args.model} if args.model else {}))
    engine = Engine(settings)
    report = engine.load()
    out = {"model": settings.model, "dtype": report.dtype, "quantize": report.quantize, **reply_log_likelihood(engine)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
