"""Verification of circuits by real interventions (`checks`) and against known ground
truth (`groundtruth`)."""
