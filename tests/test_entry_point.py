import subprocess
import sys
import textwrap


def test_backend_name_works_without_importing_the_package():
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        sys.path.insert(0, %r)
        from toy import ToyDiT
        assert "foresight_compile" not in sys.modules
        fast = torch.compile(ToyDiT(), backend="foresight", options={"lowering": "eager", "policy": "static"})
        with torch.no_grad():
            fast(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([10.0]))
        import foresight_compile
        print(foresight_compile.stats(fast).steps)
    """ % __file__.rsplit("/", 1)[0])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("1")
