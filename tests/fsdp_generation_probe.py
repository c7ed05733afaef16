"""Generation from an FSDP2-sharded model, for the FSDP test: ``fsdp_generation_probe.py OUT``.

Launched by ``accelerate launch`` with an FSDP2 config on 2 CPU processes. Each process prepares
the tiny zero-expert student of ``loss_probe.py`` with FSDP2 and samples, inside
:func:`~zeda_trainer.common.sharding.full_parameters`, a number of tokens that differs between
the processes (so they run different numbers of forwards), as OPD's sampler does. Then it takes
one training step on a batch shared by all processes. It writes to ``OUT.<rank>`` (``torch.save``)
the generations and those of an unsharded copy of the model, whether the parameters are sharded
again after sampling and after the training forward, and the weights after the step, gathered.
"""

import copy
import sys

import torch
from loss_probe import VOCAB, tiny_models
from torch.distributed.tensor import DTensor

from zeda_trainer.common.generation import generate
from zeda_trainer.common.loop import make_accelerator
from zeda_trainer.common.sharding import full_parameters

PROMPT_LENGTHS = [(3, 5), (6, 2, 4)]  # per rank: its prompts' lengths
NEW_TOKENS = [2, 7]  # per rank: tokens to sample


def sharded(module: torch.nn.Module) -> bool:
    return all(isinstance(p, DTensor) for p in module.parameters())


def main(out: str) -> None:
    accelerator = make_accelerator()
    rank = accelerator.process_index
    student, _ = tiny_models()
    plain = copy.deepcopy(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(student, optimizer)
    generator = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS[rank]]

    def sample(net: torch.nn.Module) -> list[list[int]]:
        net.eval()
        found = generate(net, prompts, NEW_TOKENS[rank], eos_token_id=-1, pad_token_id=0, record_routes=True)
        net.train()
        return [g.tokens for g in found]

    with full_parameters(model):
        unsharded_inside = not any(isinstance(p, DTensor) for p in model.parameters())
        tokens = sample(model)
    sharded_after_sampling = sharded(model)

    batch = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    loss = model(input_ids=batch, labels=batch).loss
    # The decoder layers reshard after their forward (the root keeps its parameters for the backward).
    sharded_after_forward = all(sharded(layer) for layer in model.model.layers)
    accelerator.backward(loss)
    optimizer.step()
    weights = accelerator.get_state_dict(model)

    reference = {"tokens": sample(plain)}
    reference_optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    plain(input_ids=batch, labels=batch).loss.backward()
    reference_optimizer.step()
    reference["weights"] = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    torch.save(
        {
            "tokens": tokens,
            "unsharded_inside": unsharded_inside,
            "sharded_after_sampling": sharded_after_sampling,
            "sharded_after_forward": sharded_after_forward,
            "weights": weights,
            "reference": reference,
        },
        f"{out}.{rank}",
    )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
