"""Scores: the component's scorer, the paper's exhaustive protocol and
end-to-end evaluation of whole pipelines."""
