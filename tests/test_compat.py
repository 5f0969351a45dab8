"""The run-time check for installed combinations in which fla models' generate() decodes wrongly."""

from __future__ import annotations

import subprocess
import sys

import torch
import transformers
from fla.models import DeltaNetConfig
from transformers.generation import GenerationMixin

from staterank.compat import TRANSFORMERS_PIN, fla_generate_problem
from staterank.loading import prepare_runtime

prepare_runtime("delta_net")


def greedy_generate_and_recompute(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """generate() with the model's cache, and greedy decoding that reruns the whole prefix without it."""
    with torch.no_grad():
        generated = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False, use_cache=True,
            eos_token_id=None, pad_token_id=0,
        )
        ids = prompt
        for _ in range(steps):
            ids = torch.cat((ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return generated, ids


def test_the_check_agrees_with_what_generate_does():
    """Under the lock the check finds nothing and generate is right; under a broken transformers it finds the
    problem and generate is wrong (run by `make test-latest TRY='transformers==5.24.0'`)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        DeltaNetConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100)
    ).eval()
    torch.manual_seed(2)
    generated, recomputed = greedy_generate_and_recompute(model, torch.randint(3, 100, (2, 9)), steps=8)
    assert (fla_generate_problem(type(model)) is None) == torch.equal(generated, recomputed)


class TakesPastKeyValues:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        pass


class TakesCache:
    def forward(self, input_ids=None, past_key_values=None, cache=None, use_cache=None, **kwargs):
        pass


def test_a_renamed_cache_argument_is_found(monkeypatch):
    def renamed(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, **kwargs):
        pass

    def original(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        pass

    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", renamed)
    problem = fla_generate_problem(TakesPastKeyValues)
    assert problem is not None and TRANSFORMERS_PIN in problem and "TakesPastKeyValues" in problem
    assert "\n" not in problem
    assert fla_generate_problem(TakesCache) is None  # a model that takes `cache` decodes right
    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", original)
    assert fla_generate_problem(TakesPastKeyValues) is None


def test_the_cli_says_it_in_one_line_and_goes_on():
    """`staterank info` on an fla model under the broken combination: exit 0, one warning line on stderr."""
    script = (
        "import sys\n"
        "from transformers.generation import GenerationMixin\n"
        "def renamed(self, input_ids, next_sequence_length=None, cache=None, **kwargs): pass\n"
        "GenerationMixin.prepare_inputs_for_generation = renamed\n"
        "from staterank.cli import main\n"
        "sys.exit(main(['info', 'tiny-deltanet']))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("staterank: warning: transformers "), run.stderr
    assert TRANSFORMERS_PIN in lines[0]
