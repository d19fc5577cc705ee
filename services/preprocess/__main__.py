from services.common.lifecycle import run
from services.preprocess.service import Preprocess
from services.preprocess.settings import PreprocessSettings

if __name__ == "__main__":
    run(Preprocess(PreprocessSettings()))
