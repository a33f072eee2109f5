"""Multiple choice: log-likelihoods against transformers, the benchmark layouts, and a planted task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.eval import multiple_choice as mc
from lmforge.eval.tasks import Task, parse_tasks, take
from tests.tiny import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mc") / "ckpt"
    model = make_tiny_model("qwen2-tiny")
    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("test"))
    return directory


def _hf_score(hf: torch.nn.Module, prefix: list[int], cont: list[int]) -> tuple[float, bool]:
    """(log-likelihood, greedy?) of `cont` after `prefix` from one plain transformers forward."""
    with torch.no_grad():
        logits = hf(torch.tensor([prefix + cont])).logits[0, len(prefix) - 1 : -1]  # predicts each cont token
    logp = F.log_softmax(logits, -1)
    return sum(logp[j, t].item() for j, t in enumerate(cont)), bool((logits.argmax(-1) == torch.tensor(cont)).all())


def test_scores_equal_transformers_and_batching_changes_nothing(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prefix = tok.encode("The following are questions.\n北京是中国的首都吗？\nAnswer:")
    conts = [tok.encode(t) for t in (" A", " yes, it is", " 是的，北京是首都", " no")]
    want = [_hf_score(hf, prefix, c)[0] for c in conts]
    batched = mc.score_continuations(model, prefix, conts)
    alone = [mc.score_continuations(model, prefix, [c])[0] for c in conts]
    assert batched == pytest.approx(want, abs=1e-4)
    assert alone == pytest.approx(batched, abs=1e-5)


def test_packed_questions_score_as_each_alone(tiny_dir: Path) -> None:
    """Prompts of different lengths and options of one or many tokens, packed into shared forwards."""
    model, tok = load_checkpoint(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = ["Q: 1+1?\nAnswer:", "北京是中国的首都吗？请回答。\n答案：", "A fox. Which animal?\nAnswer:"]
    options = [" A", " B", " yes, it is", " 是的，北京是首都", " the fox"]
    groups = [(tok.encode(p), [tok.encode(o) for o in options[i:]]) for i, p in enumerate(prompts)]
    groups.append((tok.encode("Only letters:"), [tok.encode(" A"), tok.encode(" B")]))  # no second stage at all
    assert len({len(p) for p, _ in groups}) == len(groups) and any(len(c) > 1 for c in groups[0][1])
    want = [[_hf_score(hf, p, c) for c in cs] for p, cs in groups]
    one_pack = mc.score_groups(model, groups, budget=10**6)
    one_each = mc.score_groups(model, groups, budget=1)
    for got in (one_pack, one_each):
        assert [[g for g, _ in row] for row in got] == [[pytest.approx(w, abs=1e-4) for w, _ in row] for row in want]
        assert [[g for _, g in row] for row in got] == [[g for _, g in row] for row in want]


def test_packed_scoring_with_a_ptuning_prefix_equals_a_plain_forward(tiny_dir: Path) -> None:
    """The prefix's slots come before every packed group's tokens, seen by all, and shift their RoPE positions."""
    from lmforge.train.ptuning import PtuningConfig, apply_ptuning

    model, tok = load_checkpoint(tiny_dir)
    torch.manual_seed(0)
    apply_ptuning(model, PtuningConfig(prefix_len=3, init_std=0.5))
    groups = [(tok.encode("Q: 1+1?\nAnswer:"), [tok.encode(" two"), tok.encode(" 二")]),
              (tok.encode("北京？\n答案："), [tok.encode(" 是的，北京是首都"), tok.encode(" A")])]
    with torch.no_grad():
        want = []
        for prefix, conts in groups:
            row = []
            for c in conts:
                logp = F.log_softmax(model(torch.tensor([prefix + c]))[0, len(prefix) - 1 : -1], -1)
                row.append(sum(logp[j, t].item() for j, t in enumerate(c)))
            want.append(row)
    got = mc.score_groups(model, groups, budget=10**6)
    assert [[g for g, _ in row] for row in got] == [[pytest.approx(w, abs=1e-4) for w in row] for row in want]


def write_csv(path: Path, rows: list[list[str]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def test_reads_mmlu_ceval_cmmlu_and_jsonl_layouts(tmp_path: Path) -> None:
    row = ["What is 2 + 2?", "3", "4", "5", "6", "B"]
    write_csv(tmp_path / "mmlu/test/high_school_math_test.csv", [row, row])
    write_csv(tmp_path / "mmlu/dev/high_school_math_dev.csv", [row])
    zh = ["1+1等于几？", "1", "2", "3", "4", "B"]
    write_csv(
        tmp_path / "ceval/val/math_val.csv",
        [["id", "question", "A", "B", "C", "D", "answer", "explanation"], ["0", *zh, ""]],
    )
    write_csv(
        tmp_path / "ceval/dev/math_dev.csv",
        [["id", "question", "A", "B", "C", "D", "answer", "explanation"], ["0", *zh, "因为"]],
    )
    write_csv(tmp_path / "cmmlu/test/math.csv", [["", "Question", "A", "B", "C", "D", "Answer"], ["0", *zh]])
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Pick", "choices": ["x", "y"], "answer": 1}) + "\n")
    tasks = parse_tasks(f"mmlu:{tmp_path}/mmlu,ceval:{tmp_path}/ceval,cmmlu:{tmp_path}/cmmlu,mc:{tmp_path}/q.jsonl")
    loaded = [mc.load(t) for t in tasks]
    assert [(len(q), len(d)) for q, d in loaded] == [(2, 1), (1, 1), (1, 0), (1, 0)]
    q = loaded[0][0][0]
    assert (q.choices, q.answer, q.subject, q.lang) == (["3", "4", "5", "6"], 1, "high_school_math", "en")
    assert loaded[1][0][0].lang == "zh" and loaded[3][0][0].answer == 1
    prompt = mc.build_prompt(q, loaded[0][1])
    assert prompt.startswith("The following are multiple choice questions (with answers) about high school math.")
    assert prompt.endswith("What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:") and "Answer: B\n\n" in prompt
    assert mc.build_prompt(loaded[1][0][0], []).endswith("D. 4\n答案：")


def test_wrong_layouts_name_the_file_and_the_problem(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "ceval/val/x_val.csv", [["id", "question", "A", "B", "C", "D"], ["0", "q", "1", "2", "3", "4"]]
    )
    with pytest.raises(LmforgeError, match=r"x_val.csv: the header has no column 'answer'"):
        mc.load(Task("c", "ceval", tmp_path / "ceval"))
    write_csv(tmp_path / "mmlu/test/x_test.csv", [["q", "1", "2", "3", "4", "E"]])
    with pytest.raises(LmforgeError, match=r"x_test.csv: row 1: answer 'E' is not one of A, B, C, D"):
        mc.load(Task("m", "mmlu", tmp_path / "mmlu"))
    write_csv(tmp_path / "short/test/x_test.csv", [["q", "1", "2"]])
    with pytest.raises(LmforgeError, match=r"row 1 has 3 columns"):
        mc.load(Task("m", "mmlu", tmp_path / "short"))
    with pytest.raises(LmforgeError, match="dev/ and test/"):
        parse_tasks(f"mmlu:{tmp_path}/absent")


def planted_model(tok, questions: list[mc.Question], steps: int = 80) -> torch.nn.Module:
    """A tiny model trained on the solved prompts until it knows every answer letter."""
    torch.manual_seed(0)
    model = make_tiny_model("llama-tiny").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([tok.encode(mc.build_prompt(q, []) + " " + mc.LETTERS[q.answer]) for q in questions])
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1])[:, -1], x[:, -1])  # only the answer letter
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_planted_task_scores_100_and_a_random_model_near_chance(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    rows = [
        {"question": f"Question {i}: which one?", "choices": ["red", "green", "blue", "gold"], "answer": i % 4}
        for i in range(8)
    ]
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = Task("planted", "mc", path)
    questions, _ = mc.load(task)
    trained = mc.evaluate(planted_model(tok, questions), tok, task, progress=False)
    assert trained.metrics()["acc"] == 1.0
    shipped = parse_tasks("knowledge")[0]
    random = mc.evaluate(make_tiny_model("llama-tiny", seed=1), tok, shipped, progress=False).metrics()
    assert random["n"] == 48 and 0.1 <= random["acc"] <= 0.45 and 0.1 <= random["acc_norm"] <= 0.45
    assert set(random["by_lang"]) == {"en", "zh"}


def test_a_limit_takes_both_languages_in_file_order() -> None:
    items = ["en1", "en2", "en3", "en4", "zh1", "zh2"]
    assert take(items, 3, lambda s: s[:2]) == ["en1", "en2", "zh1"]
    assert take(items, 5, lambda s: s[:2]) == ["en1", "en2", "en3", "zh1", "zh2"]
    assert take(items, None, lambda s: s[:2]) == items and take(items, 9, lambda s: s[:2]) == items


def test_long_prompts_lose_shots_and_say_so(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)  # 256-token context
    task = parse_tasks("knowledge")[0]
    result = mc.evaluate(model, tok, task, shots=5, limit=4, progress=False)
    assert result.shots_reduced == 4 and all(p["shots"] < 5 for p in result.predictions)
