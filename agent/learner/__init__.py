"""The learner: slow system (bundle encoder + head) fused with the fast episodic memory."""

from agent.learner.config import LearnerConfig
from agent.learner.learner import Learner, LearnResult, Prediction

__all__ = ["LearnResult", "Learner", "LearnerConfig", "Prediction"]
