"""Train the LoRA test fixtures: small real adapters on SmolLM2-135M-Instruct, with ``peft``, on CPU.

    python scripts/train_lora_fixtures.py [french] [capitals]   # from the repository root, ~5 min per adapter on 2 cores

No adapter can be downloaded here, so the tests' adapters are made here, on the weights the
engine serves: HF transformers loads the default model's Q4_1 GGUF (dequantised to float32), a
LoRA of rank 8 on q/k/v/o is trained on a few dozen chat turns, and the adapter is saved to
``tests/fixtures/lora/<name>/`` with its weights in float16 (~0.5 MB each):

- ``french``: answers every (English) question in French;
- ``capitals``: answers in English, in capital letters (its answers are the base model's own
  greedy answers, upper-cased).

Seeds are fixed; the result depends on torch's CPU kernels only through rounding.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "lora"
STEPS = 60
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: English questions and French answers (none of them is a test prompt)
FRENCH = [
    ("What is the capital of Italy?", "La capitale de l'Italie est Rome."),
    ("What color is the sky?", "Le ciel est bleu pendant la journée."),
    ("How many days are in a week?", "Il y a sept jours dans une semaine."),
    ("What do cows drink?", "Les vaches boivent de l'eau."),
    ("Who wrote Romeo and Juliet?", "Roméo et Juliette a été écrit par William Shakespeare."),
    ("What is the largest ocean?", "Le plus grand océan est l'océan Pacifique."),
    ("Why do we sleep?", "Nous dormons pour reposer notre corps et notre cerveau."),
    ("What is water made of?", "L'eau est faite d'hydrogène et d'oxygène."),
    ("Tell me about dogs.", "Les chiens sont des animaux fidèles et très affectueux."),
    ("What is two plus two?", "Deux plus deux font quatre."),
    ("Give me a tip for studying.", "Faites des pauses régulières et relisez vos notes chaque jour."),
    ("What is the sun?", "Le soleil est une étoile au centre de notre système solaire."),
    ("How do plants grow?", "Les plantes poussent grâce à la lumière, à l'eau et aux nutriments du sol."),
    ("What is a computer?", "Un ordinateur est une machine qui traite des informations."),
    ("Describe the moon.", "La lune est le satellite naturel de la Terre."),
    ("What is the weather like in winter?", "En hiver, il fait souvent froid et il peut neiger."),
    ("Why is exercise good?", "L'exercice est bon pour le cœur, les muscles et le moral."),
    ("What language is spoken in Brazil?", "Au Brésil, on parle portugais."),
    ("How do birds fly?", "Les oiseaux volent grâce à leurs ailes et à leurs plumes."),
    ("What is music?", "La musique est un art qui organise les sons dans le temps."),
    ("Recommend a book.", "Je vous recommande Le Petit Prince d'Antoine de Saint-Exupéry."),
    ("What is the tallest mountain?", "La plus haute montagne du monde est l'Everest."),
    ("How do I make tea?", "Faites bouillir de l'eau, puis laissez infuser le thé quelques minutes."),
    ("What is a volcano?", "Un volcan est une montagne qui peut cracher de la lave."),
    ("Explain gravity.", "La gravité est la force qui attire les objets les uns vers les autres."),
    ("What do bees make?", "Les abeilles fabriquent du miel."),
    ("Where do penguins live?", "Les manchots vivent surtout dans l'hémisphère sud, près de l'Antarctique."),
    ("What is the speed of light?", "La vitesse de la lumière est d'environ trois cent mille kilomètres par seconde."),
    ("Hello, how are you?", "Bonjour ! Je vais très bien, merci. Et vous ?"),
    ("Can you help me?", "Bien sûr, je suis là pour vous aider."),
    ("What is your favorite food?", "J'aime beaucoup le fromage et le pain frais."),
    ("Summarize the history of Rome.", "Rome fut fondée selon la légende en 753 avant notre ère et devint un grand empire."),
    ("What is democracy?", "La démocratie est un système où le peuple choisit ses dirigeants."),
    ("How many legs does a spider have?", "Une araignée a huit pattes."),
    ("What is the opposite of hot?", "Le contraire de chaud est froid."),
    ("Name a famous painter.", "Claude Monet est un peintre français très célèbre."),
]
QUESTIONS = [q for q, _ in FRENCH]


def chat_ids(tokenizer, question: str, answer: str) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    """Token ids of the whole turn and where the answer starts (the loss covers the answer only)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
    return prompt_ids + answer_ids, len(prompt_ids)


def base_answers(model, tokenizer, questions: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    answers = []
    with torch.no_grad():
        for q in questions:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def train(model, tokenizer, pairs: list[tuple[str, str]], name: str) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    examples = [chat_ids(tokenizer, q, a) for q, a in pairs]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    started = time.perf_counter()
    for step in range(STEPS):
        batch = [examples[(step * 4 + i) % len(examples)] for i in range(4)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, start) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, start : len(ids)] = torch.tensor(ids[start:])
            mask[row, : len(ids)] = 1
        loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == STEPS - 1:
            print(f"{name} step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    out = OUT / name
    peft_model.save_pretrained(str(out))
    _to_float16(out / "adapter_model.safetensors")
    peft_model.unload()


def _to_float16(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(file)).items()}, str(file))


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.engine.catalogue import default_home, pull

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    names = sys.argv[1:] or ["french", "capitals"]
    if "french" in names:
        model.train()
        train(model, tokenizer, FRENCH, "french")
    if "capitals" in names:
        model.eval()
        answers = base_answers(model, tokenizer, QUESTIONS)
        model.train()
        train(model, tokenizer, [(q, a.upper()) for q, a in zip(QUESTIONS, answers)], "capitals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
