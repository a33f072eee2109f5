"""Evaluation: perplexity on text files, multiple-choice and generative tasks, and the report card.

`perplexity` scores text with a sliding window; `tasks` names and parses tasks (`KIND:PATH` or a shipped name);
`multiple_choice` and `generative` score them; `report` writes results.json, predictions and the report card.
"""
