"""Pages a person reads: a query's ranked results (`results_page`, with a PNG contact
sheet) and the evaluation's report.html (`report_page`). Presentation only: the
retrieval maths stays in `procir_jax.eval.recall` and `procir_jax.eval.search`."""
