"""`lmforge data synth`: deterministic simple stories in English and Chinese, for tiny models and tests.

No story corpus (TinyStories and the like) exists offline here, so this writes short stories from sentence
templates and word lists: an opening, several events drawn without repetition, an ending. The same seed gives
the same stories byte for byte; different stories differ enough not to be near-duplicates of each other.
It is not a language model and does not pretend to be one: the text is grammatical and repetitive by design.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.io import JsonlShardWriter, check_out_dir, write_manifest
from lmforge.data.report import StageStats, write_report
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir


def _words(spaced: str) -> list[str]:
    return spaced.split()


EN = {
    "name": _words("Lily Tom Mia Ben Sam Anna Max Lucy Jack Emma Leo Zoe Noah Ruby Finn Ella Owen Ivy Theo Nora"),
    "animal": _words("cat dog bird rabbit fox bear duck frog mouse horse owl turtle lamb pig goat deer"),
    "place": ["park", "garden", "forest", "beach", "farm", "river", "hill", "town", "school", "kitchen", "lake",
              "meadow", "library", "market", "field"],
    "thing": ["red ball", "blue kite", "big box", "small boat", "shiny key", "green hat", "yellow cup", "old map",
              "soft blanket", "wooden toy", "little drum", "paper star", "warm coat", "sweet apple", "long rope"],
    "adj": _words("happy brave kind curious shy gentle clever quiet funny careful"),
    "feel": _words("happy sad scared excited tired surprised proud calm"),
}
EN_OPEN = [
    "Once upon a time, there was a {adj} {animal} named {name}.",
    "One sunny day, {name} went to the {place} with a {thing}.",
    "{name} was a {adj} child who lived near the {place}.",
    "In a small house by the {place}, a {animal} and {name} were friends.",
    "Every morning, {name} liked to walk to the {place}.",
    "There was once a {adj} girl called {name} who loved her {thing}.",
]
EN_EVENT = [
    "{name} saw a {animal} sitting under a tree.",
    "The {animal} looked at the {thing} and smiled.",
    "Suddenly, the wind blew the {thing} far away.",
    "{name} felt {feel} and did not know what to do.",
    "They played together until the sun went down.",
    "A {adj} {animal} came to help and said, \"Do not worry.\"",
    "{name} ran to the {place} as fast as possible.",
    "It started to rain, so they hid under a big leaf.",
    "The friends shared the {thing} and laughed a lot.",
    "{name} asked the {animal}, \"Will you be my friend?\"",
    "They found a {thing} next to the {place}.",
    "Mom called {name} home for dinner, but there was one more thing to do.",
    "The {animal} was {feel} because it was lost.",
    "{name} and the {animal} looked for the way back together.",
    "At the {place}, they met an old man with a {thing}.",
    "{name} learned that it is good to be {adj}.",
]
EN_END = [
    "In the end, {name} was {feel} and went to sleep.",
    "From that day on, {name} and the {animal} were best friends.",
    "{name} smiled, because it had been a good day.",
    "They went home, tired but {feel}.",
    "And {name} never forgot the day at the {place}.",
    "The {animal} said thank you, and {name} felt very {feel}.",
]
ZH = {
    "name": _words("小明 小红 小华 小丽 小刚 小芳 小军 小美 小东 小雪 小兰 小强 小玉 小林 小云 小星"),
    "animal": _words("小猫 小狗 小鸟 小兔 狐狸 小熊 小鸭 青蛙 小鼠 小马 猫头鹰 乌龟 小羊 小猪"),
    "place": _words("公园 花园 森林 海边 农场 河边 山上 小镇 学校 厨房 湖边 草地 图书馆 市场"),
    "thing": _words("红气球 蓝风筝 大箱子 小木船 金钥匙 绿帽子 黄杯子 旧地图 小毯子 木头玩具 小鼓 纸星星 苹果 长绳子"),
    "adj": _words("快乐 勇敢 善良 好奇 害羞 温柔 聪明 安静 有趣 细心"),
    "feel": _words("开心 难过 害怕 兴奋 累 惊讶 骄傲 平静"),
}
ZH_OPEN = [
    "从前，有一只{adj}的{animal}，它叫{name}。",
    "一个晴朗的早上，{name}带着{thing}去了{place}。",
    "{name}是一个{adj}的孩子，住在{place}旁边。",
    "在{place}边的小房子里，{animal}和{name}是好朋友。",
    "每天早上，{name}都喜欢走到{place}去玩。",
    "有一个{adj}的小女孩叫{name}，她很喜欢她的{thing}。",
]
ZH_EVENT = [
    "{name}看见一只{animal}坐在大树下面。",
    "{animal}看着{thing}，笑了起来。",
    "忽然，一阵大风把{thing}吹走了。",
    "{name}觉得很{feel}，不知道该怎么办。",
    "他们一起玩，一直玩到太阳下山。",
    "一只{adj}的{animal}跑过来说：“别担心，我来帮你。”",
    "{name}飞快地跑到了{place}。",
    "天下起了雨，他们躲到一片大叶子下面。",
    "朋友们一起分享{thing}，笑得很开心。",
    "{name}问{animal}：“你愿意做我的朋友吗？”",
    "他们在{place}旁边找到了一个{thing}。",
    "妈妈叫{name}回家吃饭，可是还有一件事没有做完。",
    "{animal}迷路了，心里很{feel}。",
    "{name}和{animal}一起寻找回家的路。",
    "在{place}，他们遇到了一位拿着{thing}的老爷爷。",
    "{name}明白了，做一个{adj}的人是很好的。",
]
ZH_END = [
    "最后，{name}很{feel}地睡着了。",
    "从那天起，{name}和{animal}成了最好的朋友。",
    "{name}笑了，因为今天是美好的一天。",
    "他们回到家，虽然很累，但是很{feel}。",
    "{name}永远记得在{place}的那一天。",
    "{animal}说了谢谢，{name}觉得非常{feel}。",
]
TEMPLATES = {"en": (EN, EN_OPEN, EN_EVENT, EN_END, " "), "zh": (ZH, ZH_OPEN, ZH_EVENT, ZH_END, "")}


def story(rng: random.Random, lang: str) -> str:
    words, opening, events, ending, sep = TEMPLATES[lang]
    slots = {k: rng.choice(v) for k, v in words.items()}
    sentences = [rng.choice(opening), *rng.sample(events, rng.randint(4, 7)), rng.choice(ending)]
    # a second name and object for the later half, so stories with the same cast still differ
    later = {**slots, "thing": rng.choice(words["thing"]), "place": rng.choice(words["place"])}
    half = len(sentences) // 2
    return sep.join(s.format(**(slots if i < half else later)) for i, s in enumerate(sentences))


@dataclass
class SynthConfig:
    out: str
    docs: int = 10_000
    seed: int = 0
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    shard_docs: int = 100_000
    overwrite: bool = False


def main(cfg: SynthConfig) -> dict:
    unknown = [lang for lang in cfg.langs if lang not in TEMPLATES]
    if unknown or not cfg.langs:
        raise LmforgeError(f"--langs {','.join(cfg.langs)}: synthetic stories exist for en and zh only")
    out = Path(cfg.out)
    check_out_dir(out, "synth", cfg.overwrite)
    rng, stats = random.Random(cfg.seed), StageStats("synth")
    with atomic_dir(out) as tmp:
        writer = JsonlShardWriter(tmp, cfg.shard_docs)
        for i in range(cfg.docs):
            lang = cfg.langs[i % len(cfg.langs)]
            text = story(rng, lang)
            writer.write({"text": text, "lang": lang, "source": "synth"})
            stats.seen(text)
            stats.kept(text, lang)
        outputs = writer.close()
        write_manifest(tmp, "synth", dataclasses.asdict(cfg), [], outputs)
        report = write_report(tmp, stats)
    return report
