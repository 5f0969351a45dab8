"""lm-evaluation-harness task definitions shipped with staterank (see :mod:`staterank.lm_eval_bridge`)."""
