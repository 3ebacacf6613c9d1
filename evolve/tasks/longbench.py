"""LongBench (v1) tasks read from JSONL files on disk: LongBench's own prompts, lengths and metrics.

Nothing is downloaded: point a task at a file with LongBench's row format
(``input``, ``context``, ``answers``, ``all_classes``, ``length``, ...), e.g. one of
the ``data/*.jsonl`` files of the THUDM/LongBench release.

Prompt templates and max generation lengths are LongBench's ``config/dataset2prompt.json``
and ``config/dataset2maxlen.json``; metric assignment is its ``eval.py``. Prompts go to
``/v1/completions`` as plain text (no chat template): evolution scores the eviction
policy relative to the same model's full-cache answers on the same prompts, so the
template only has to be identical for both.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class DatasetSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    prompt: str
    max_tokens: int
    metric: str


_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)

DATASETS: dict[str, DatasetSpec] = {
    # "asconcisely" (sic, twice): LongBench v1's file, which evo-memory also ships; later LongBench fixed it.
    "narrativeqa": DatasetSpec(
        prompt="You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
        "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        max_tokens=128,
        metric="qa_f1_score",
    ),
    "qasper": DatasetSpec(
        prompt="You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer '
        "the question based on the above article as concisely as you can, using a single phrase or sentence if "
        "possible. If the question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        max_tokens=128,
        metric="qa_f1_score",
    ),
    "multifieldqa_en": DatasetSpec(
        prompt="Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:",
        max_tokens=64,
        metric="qa_f1_score",
    ),
    "multifieldqa_zh": DatasetSpec(
        prompt="阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        max_tokens=64,
        metric="qa_f1_zh_score",
    ),
    "hotpotqa": DatasetSpec(prompt=_QA_PASSAGES, max_tokens=32, metric="qa_f1_score"),
    "2wikimqa": DatasetSpec(prompt=_QA_PASSAGES, max_tokens=32, metric="qa_f1_score"),
    "musique": DatasetSpec(prompt=_QA_PASSAGES, max_tokens=32, metric="qa_f1_score"),
    "dureader": DatasetSpec(
        prompt="请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        max_tokens=128,
        metric="rouge_zh_score",
    ),
    "gov_report": DatasetSpec(
        prompt="You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        max_tokens=512,
        metric="rouge_score",
    ),
    "qmsum": DatasetSpec(
        prompt="You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above "
        "meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        max_tokens=512,
        metric="rouge_score",
    ),
    "multi_news": DatasetSpec(
        prompt="You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:",
        max_tokens=512,
        metric="rouge_score",
    ),
    "vcsum": DatasetSpec(
        prompt="下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        max_tokens=512,
        metric="rouge_zh_score",
    ),
    "trec": DatasetSpec(
        prompt="Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}",
        max_tokens=64,
        metric="classification_score",
    ),
    "triviaqa": DatasetSpec(
        prompt="Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}",
        max_tokens=32,
        metric="qa_f1_score",
    ),
    "samsum": DatasetSpec(
        prompt="Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}"
        "\n\n{input}",
        max_tokens=128,
        metric="rouge_score",
    ),
    "lsht": DatasetSpec(
        prompt="请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
        max_tokens=64,
        metric="classification_score",
    ),
    "passage_count": DatasetSpec(
        prompt="There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
        "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        max_tokens=32,
        metric="count_score",
    ),
    "passage_retrieval_en": DatasetSpec(
        prompt="Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
        'number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
        '"Paragraph 2", etc.\n\nThe answer is: ',
        max_tokens=32,
        metric="retrieval_score",
    ),
    "passage_retrieval_zh": DatasetSpec(
        prompt="以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}"
        '\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        max_tokens=32,
        metric="retrieval_zh_score",
    ),
}


class LongBenchRow(BaseModel):
    """One line of a LongBench JSONL file (fields we use; others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    input: str = ""
    context: str
    answers: list[str] = Field(min_length=1)
    all_classes: list[str] | None = None
    length: int | None = None
    dataset: str | None = None
    id: str | None = Field(None, alias="_id")


class LongBenchSample(BaseModel):
    model_config = ConfigDict(frozen=True)
    dataset: str
    index: int
    prompt: str
    answers: list[str]
    all_classes: list[str] | None
    length: int | None
    max_tokens: int


def build_prompt(dataset: str, row: LongBenchRow) -> str:
    # str.format only expands the template's own fields; braces inside context/input are data.
    return DATASETS[dataset].prompt.format(context=row.context, input=row.input)


def load_longbench(path: str | Path, dataset: str) -> list[LongBenchSample]:
    """Read and validate a LongBench JSONL file; errors name the file and line."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LongBench file for {dataset} not found: {path}")
    samples: list[LongBenchSample] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = LongBenchRow.model_validate(json.loads(line))
            except (json.JSONDecodeError, ValidationError) as e:
                raise ValueError(f"{path}:{lineno}: not a LongBench row: {e}") from None
            if spec.metric == "classification_score" and not row.all_classes:
                raise ValueError(f"{path}:{lineno}: {dataset} rows need 'all_classes'")
            samples.append(
                LongBenchSample(
                    dataset=dataset,
                    index=len(samples),
                    prompt=build_prompt(dataset, row),
                    answers=row.answers,
                    all_classes=row.all_classes,
                    length=row.length,
                    max_tokens=spec.max_tokens,
                )
            )
    if not samples:
        raise ValueError(f"{path}: no rows")
    return samples


def score_sample(sample: LongBenchSample, prediction: str) -> float:
    from evolve.tasks.metrics import score_prediction

    return score_prediction(
        sample.dataset, DATASETS[sample.dataset].metric, prediction, sample.answers, sample.all_classes
    )
