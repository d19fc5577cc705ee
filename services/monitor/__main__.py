from services.common.lifecycle import run
from services.monitor.service import Monitor
from services.monitor.settings import MonitorSettings

if __name__ == "__main__":
    run(Monitor(MonitorSettings()))
