"""The long-context benchmark suite: generated tasks (tasks, vocab), the methods it compares
(methods), the harness that attaches the store and generates (runner), RULER string-match scoring
(scoring) and the summary tables and plots (report). `kvstore-bench run|quick|list|report` drives it."""
