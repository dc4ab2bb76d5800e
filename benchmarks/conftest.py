import sys
from pathlib import Path

# Benchmarks import their sibling scripts (step_ratio.py) as modules.
sys.path.insert(0, str(Path(__file__).parent))
