"""Quality filters, normalization and PII scrubbing on hand-written Chinese and English text."""

from __future__ import annotations

import pytest

from lmforge.data import filters

EN_GOOD = (
    "The ferry to the island leaves at seven, and on most mornings it carries more crates than people. "
    "There are boxes of lettuce for the hotel, a crate of bread from the mainland bakery, and usually a dog "
    "that belongs to nobody in particular. The crossing takes forty minutes when the sea is calm."
)
ZH_GOOD = (
    "每年春节前的一个星期，外婆家的厨房就从早忙到晚。她先把糯米泡上一夜，第二天用石磨磨成米浆，"
    "装进布袋里吊在屋檐下沥干。我们小孩子最喜欢的是包汤圆的那个下午。"
)
ZH_TRADITIONAL = "這是一個關於學習與記憶的故事，我們每天都在圖書館裡讀書，寫下自己的想法。"

BAD = {
    "en spam without sentences": ("buy now cheap pills " * 30, "stop_words"),
    "en repeated sentence": ("I really love the product and it is great for me. " * 20, "top_"),
    "en boilerplate": (
        "Home | About | Contact\nAccept cookie settings\nPrivacy Policy\nTerms of Use\nAll rights reserved\n"
        "Sign up for our newsletter",
        "boilerplate",
    ),
    "en repeated lines": ("\n".join(["Breaking news: the market is open today and it is busy."] * 4 + [EN_GOOD]),
                          "repeated_lines"),
    "en too short": ("The cat sat on the mat.", "too_short"),
    "en lorem ipsum": ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, " * 5, "lorem_ipsum"),
    "en digits": (" ".join(str(n * 7919) for n in range(60)) + " and the total is it", "digit_ratio"),
    "zh spam": ("点击这里免费领取大奖！" * 20, "boilerplate"),
    "zh repeated": ("我们今天去公园玩，" * 30, "top_"),
    "zh word list": ("苹果 香蕉 橘子 葡萄 西瓜 草莓 菠萝 芒果 桃子 梨子 樱桃 柠檬 荔枝 龙眼 柚子", "no_punctuation"),
    "zh too short": ("你好，世界。", "too_short"),
}


def check(text: str) -> tuple[str, str | None]:
    text = filters.normalize(text)
    lang = filters.identify_language(text)
    return lang, filters.quality(text, lang, filters.QualityConfig())


@pytest.mark.parametrize(("text", "lang"), [(EN_GOOD, "en"), (ZH_GOOD, "zh"), (ZH_TRADITIONAL, "zh")])
def test_good_text_is_kept(text: str, lang: str) -> None:
    assert check(text) == (lang, None)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_text_is_dropped_for_its_reason(name: str) -> None:
    text, reason = BAD[name]  # "top_": one of the top n-gram rules, whichever n trips first
    found = check(text)[1]
    assert found is not None and found.startswith(reason) and (reason.endswith("_") or found == reason)


def test_normalize_keeps_chinese_punctuation_and_folds_fullwidth_letters() -> None:
    assert filters.normalize("ＡＢＣ１２３，你好。\r\nmany   spaces\x00") == "ABC123，你好。\nmany spaces"


def test_traditional_to_simplified() -> None:
    assert filters.to_simplified("這是一個關於學習的故事") == "这是一个关于学习的故事"


def test_pii_is_replaced() -> None:
    text = (
        "Mail jane.doe@example.com or call 138 1234 5678, +1 415-555-0123 or (415) 555-0199. "
        "身份证号 11010519491231002X，服务器 192.168.1.20。"
    )
    scrubbed, found = filters.scrub_pii(text)
    assert scrubbed == (
        "Mail <EMAIL> or call <PHONE>, <PHONE> or <PHONE>. 身份证号 <ID_NUMBER>，服务器 <IP_ADDRESS>。"
    )
    assert found == {"<EMAIL>": 1, "<PHONE>": 3, "<ID_NUMBER>": 1, "<IP_ADDRESS>": 1}


PII = {  # one of each kind, with its placeholder
    "zhang.san_01@mail.example.com.cn": "<EMAIL>",
    "13812345678": "<PHONE>",
    "+86 138-1234-5678": "<PHONE>",
    "(415) 555-0199": "<PHONE>",
    "11010519491231002X": "<ID_NUMBER>",
    "192.168.1.20": "<IP_ADDRESS>",
}
# Where PII sits in running text. Chinese has no spaces, so it touches Han characters and full-width punctuation.
POSITIONS = {
    "start zh": "{}是我的联系方式。",
    "end zh": "我的联系方式是{}",
    "between Han": "请用{}联系我",
    "after full-width colon": "电话：{}。",
    "in full-width brackets": "联系人（{}）已确认",
    "after full-width comma": "张三，{}，李四",
    "start en": "{} is how to reach me.",
    "end en": "Reach me at {}",
    "between words": "Write to {} today.",
    "after ascii punctuation": "Contact:{}; thanks",
}


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("pii", PII)
def test_pii_is_replaced_at_every_position(pii: str, where: str) -> None:
    template = POSITIONS[where]
    scrubbed, found = filters.scrub_pii(template.format(pii))
    assert scrubbed == template.format(PII[pii])  # the whole of it, and nothing around it
    assert found == {PII[pii]: 1}


@pytest.mark.parametrize(
    "text",
    [
        "订单号138123456789已发货，编号A13812345678作废。",  # a 12-digit number and a code are not phone numbers
        "版本1.2.3于1999年发布，分机12345。",
        "On 2024-01-15 at 10:30, 1,234,567 people paid 3.14 each.",
        "Version 1.2.3 came out in 1999; call extension 12345.",
        "110105194912310021 has a wrong check digit, and 20240115 is a date.",
        "2023年12月31日，气温是-5.5度，共有3000人参加。",
        "The score was 999.300.1 and the IP-like 300.1.2.3 is not one.",
    ],
)
def test_no_false_positives_on_numbers_and_dates(text: str) -> None:
    assert filters.scrub_pii(text) == (text, {})


def test_blocklist_matches_phrases_case_insensitively() -> None:
    pattern = filters.blocklist_pattern(["# comment", "Bad Word", "", "禁词"])
    assert pattern.search("this has a bad word in it")
    assert pattern.search("这里有禁词。")
    assert not pattern.search("nothing wrong here")
    assert filters.blocklist_pattern(["# only a comment"]) is None
