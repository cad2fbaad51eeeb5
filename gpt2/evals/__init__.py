"""Evaluation: validation loss on a token split (`val_loss`), HellaSwag completion scoring (`hellaswag`),
lm-evaluation-harness tasks on our model (`lm_eval`, `lm_eval_tasks`; need the `eval` extra), and the runner
behind run_eval.py (`runner`). The trainer and run_eval.py call the same functions; each splits its items over
the ranks of a process group and reduces the results."""
