"""The README's main job runs end to end and rejects what it does not understand."""

from vllama_jax import demo


def test_demo_runs_end_to_end(tmp_path, capsys):
  assert demo.main([f"--config.workdir={tmp_path}", "--config.sampling.max_new_tokens=6",
                    "--config.sampling.greedy=true"]) == 0
  out = capsys.readouterr().out
  assert "[4/4] generating" in out and out.count("  Q: ") == 3
  assert (tmp_path / "converted" / "params").is_dir()


def test_demo_rejects_unknown_config_keys_and_arguments(capsys):
  assert demo.main(["--config.sampling.temperatur=0.5"]) == 2
  assert "unknown config key 'sampling.temperatur'" in capsys.readouterr().err
  assert demo.main(["--stray"]) == 2
  assert "unknown arguments ['--stray']" in capsys.readouterr().err
