from services.common.lifecycle import run
from services.inference.service import Inference
from services.inference.settings import InferenceSettings

if __name__ == "__main__":
    run(Inference(InferenceSettings()))
