"""lmforge as a model of lm-evaluation-harness (`lm_eval`), for users whose tasks already live there.

lm_eval finds models in its own registry and has no plugin discovery, so importing this module registers the name
`lmforge`; run the harness through it:

    python -m lmforge.eval.lm_eval_adapter --model lmforge --model_args model=DIR,quant=int4 --tasks ... [lm_eval flags]

or pass `LmforgeLM(model=..., quant=..., adapter=...)` to `lm_eval.simple_evaluate`. Requests go through the same
machinery as `lmforge eval`: log-likelihoods share each context's forward across its continuations and pack
several contexts into each forward (multiple_choice.score_groups); rolling log-likelihoods use the perplexity
windows; generation uses the engine.
It does not change lm_eval's prompts, metrics or task definitions.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.engine import Engine
from lmforge.eval.multiple_choice import score_groups
from lmforge.eval.perplexity import sum_nll, text_ids
from lmforge.loader import open_model
from lmforge.sampling import SamplingParams


@register_model("lmforge")
class LmforgeLM(LM):
    def __init__(self, model: str | None = None, quant: str | None = None, adapter: str | None = None,
                 max_length: int | None = None, **_: Any) -> None:
        super().__init__()
        loaded = open_model(model, quant, adapter)
        self.engine = Engine(loaded.model, loaded.tokenizer, max_len=int(max_length) if max_length else None)
        self.model, self.tok = loaded.model, loaded.tokenizer

    def _boundary(self) -> list[int]:
        """What an empty context conditions on: BOS if the tokenizer uses one, else end-of-text."""
        first = self.tok.bos_token_id if self.tok.add_bos else None
        first = first if first is not None else next(iter(self.tok.eos_token_ids), self.tok.bos_token_id)
        return [first]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids split from one encoding, so merges across the seam score as the model
        would see them; trailing spaces of the context belong to the continuation (as lm_eval's hf model does)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation, add_bos=False)
        ctx = self.tok.encode(context, add_bos=False) if context else []
        ctx, cont = whole[: len(ctx)], whole[len(ctx) :]
        return (ctx or self._boundary()), cont

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # Requests sharing a context (the options of one question) share one forward.
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, req in enumerate(requests):
            ctx, cont = self._pair(*req.args)
            room = self.engine.max_len - len(cont)
            groups.setdefault(tuple(ctx[-room:]), []).append((i, cont))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        # All of them at once, so that score_groups packs several questions into each forward.
        scores = score_groups(self.model, [(list(ctx), [c for _, c in members]) for ctx, members in groups.items()])
        for members, group_scores in zip(groups.values(), scores, strict=True):
            for (i, _), score in zip(members, group_scores, strict=True):
                out[i] = score
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        window = min(self.engine.max_len, 1024)
        out = []
        for req in requests:
            ids, _ = text_ids(self.tok, req.args[0])
            out.append(-sum_nll(self.model, ids, window, window // 2, progress=False) if len(ids) > 1 else 0.0)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            params = SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                    temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
                                    else 0.0, stop=list(kwargs.get("until") or []))
            ids = self.tok.encode(context, add_bos=None)[-(self.engine.max_len - params.max_new_tokens) :]
            out.append(self.engine.generate([ids], params)[0].text)
        return out


def main() -> None:
    """lm_eval's own command line, with `lmforge` registered beside its built-in models."""
    import lm_eval.models  # noqa: F401 - lm_eval fills its registry lazily only while it is empty; ours is not
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
