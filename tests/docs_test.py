"""The commands written in the README, in the code and notes of configs/, experiments/ and fer/
(their .py, .md, .txt and .sh files), and in each committed run's run.json are commands that
run: the module or script exists, every flag is one it defines, every --config file loads with
its `:arg`, and every --config.a.b override names a key of that config. Paths of this
repository named in the README exist."""

import importlib.util
import json
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent
_COMMAND = re.compile(r"python3? (-m fer\.\w+|experiments/\w+\.py)([^`\n|]*)")
_ABSL_FLAGS = {"help", "helpfull", "helpshort", "flagfile", "logtostderr", "alsologtostderr",
               "verbosity", "v"}
_REPO_PATH = re.compile(r"(?<![\w/.~])(?:configs|experiments|fer|tests)/[\w./-]*[\w/](?![\w*<])")


def _flags_in(src):
  """Flag names defined in Python source: absl's DEFINE_*("name"), argparse's
  add_argument("--name"), and those of the fer modules' define*flags() functions it calls."""
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", src))
  names |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", src))
  for module, function in re.findall(r"\b(\w+)\.(define\w*flags)\(\)", src):
    other = ROOT / "fer" / f"{module}.py"
    if other.is_file():
      body = other.read_text().split(f"\ndef {function}(", 1)[1].split("\ndef ", 1)[0]
      names |= _flags_in(body)
  return names


def _defined_flags(script):
  """The flag names a module or script defines."""
  src = script.read_text()
  return _flags_in(src) | (_ABSL_FLAGS if "absl" in src else set())


def _load_config(path, arg):
  """The config a --config=path[:arg] flag gives, as ml_collections' config_flags loads it."""
  spec = importlib.util.spec_from_file_location(f"docs_test_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _has_key(config, dotted):
  node = config
  for key in dotted.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def command_problems(text, where):
  """What is wrong with each `python -m fer.X ...` / `python experiments/X.py ...` command in
  text; commands that are templates (`{...}`, `...`) are skipped."""
  problems = []
  for match in _COMMAND.finditer(text.replace("\\\n", " ")):
    command = match.group(0)
    if "{" in command or "..." in command:
      continue
    target, rest = match.group(1), match.group(2)
    script = ROOT / (target[3:].replace(".", "/") + ".py" if target.startswith("-m ") else target)
    if not script.exists():
      problems.append(f"{where}: {command!r}: no {script.relative_to(ROOT)}")
      continue
    defined = _defined_flags(script)
    try:
      tokens = shlex.split(rest, comments=True)
    except ValueError:
      tokens = rest.split()
    config = None
    for token in tokens:
      flag = re.match(r"--([\w.-]+)(=|$)", token)
      if not flag:
        continue
      name = flag.group(1)
      if name.startswith("config."):
        if config is None:
          problems.append(f"{where}: {command!r}: --{name} before a --config that loads")
        elif not _has_key(config, name[len("config."):]):
          problems.append(f"{where}: {command!r}: its config has no key {name[7:]}")
        continue
      if name not in defined and not (name.startswith("no") and name[2:] in defined):
        problems.append(f"{where}: {command!r}: {script.name} defines no --{name}")
      elif name == "config":
        path, _, arg = token.split("=", 1)[1].partition(":")
        config = None
        if not path.endswith(".py") or not (ROOT / path).is_file():
          problems.append(f"{where}: {command!r}: no config file {path}")
          continue
        try:
          config = _load_config(ROOT / path, arg)
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"{where}: {command!r}: {path}:{arg} does not load: {e!r}")
  return problems


def _documents():
  yield "README.md", (ROOT / "README.md").read_text()
  for folder, pattern in (("configs", "*.py"), ("experiments", "*.py"), ("fer", "*.py"),
                          ("experiments", "*.md"), ("experiments", "*.txt"),
                          ("experiments", "*.sh")):
    for path in sorted((ROOT / folder).rglob(pattern)):
      yield str(path.relative_to(ROOT)), path.read_text()
  for path in sorted((ROOT / "experiments" / "results").glob("*/run.json")):
    command = json.loads(path.read_text()).get("command")
    if isinstance(command, str):
      yield str(path.relative_to(ROOT)), command


def test_every_written_command_names_real_flags_and_config_keys():
  documents = dict(_documents())
  assert len(documents) > 100 and sum(len(_COMMAND.findall(t)) for t in documents.values()) > 200
  problems = [p for where, text in documents.items() for p in command_problems(text, where)]
  assert not problems, "\n".join(problems)


def test_the_check_finds_each_kind_of_mistake():
  good = ("python -m fer.main --config=configs/strong.py:runlocal --config.seed=1 "
          "--config.model.conv_features=\"(8,8,8,8)\" --workdir=/tmp/x  # a comment --bogus\n"
          "python -m fer.predict --workdir=runs/cnn --no_detect faces/\n"
          "python -m fer.video --workdir=runs/cnn --tta=flip --out=x --fps=2 clip.mp4\n"
          "python experiments/run_study.py --root=runs/study --dry_run\n"
          "python -m fer.main --config=configs/{name}.py --workdir=...\n")
  assert command_problems(good, "good") == []
  bad = ["python -m fer.nonesuch --workdir=x",
         "python experiments/nonesuch.py",
         "python -m fer.main --config=configs/strong.py --config.optim.nonesuch=1",
         "python -m fer.main --config=configs/nonesuch.py --workdir=x",
         "python -m fer.main --config=configs/strong.py:nonesuch --workdir=x",
         "python -m fer.main --config.seed=1 --config=configs/strong.py",
         "python -m fer.predict --workdir=runs/cnn --nonesuch=1",
         "python -m fer.video --workdir=runs/cnn --no_detect --out=x clip.mp4",
         "python experiments/run_study.py --root=runs/study --nonesuch"]
  for line in bad:
    assert len(command_problems(line, "bad")) == 1, line


def test_repository_paths_named_in_the_readme_exist():
  readme = (ROOT / "README.md").read_text()
  paths = {p.rstrip(".") for p in _REPO_PATH.findall(readme)}
  assert len(paths) > 50
  missing = sorted(p for p in paths if not (ROOT / p).exists())
  assert not missing, f"README.md names files that are not in the repository: {missing}"


def test_links_within_the_readme_lead_to_its_headings():
  readme = (ROOT / "README.md").read_text()
  # GitHub's anchors: the heading in lower case, punctuation but hyphens dropped, spaces as -.
  anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#{1,6} (.+)$", readme, re.M)}
  links = re.findall(r"\]\(#([^)]+)\)", readme)
  assert len(links) > 10
  assert not [a for a in links if a not in anchors], sorted(anchors)
