S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
run() { name=$1; kern=$2; shift 2; ncu --clock-control none -k regex:$kern -s 2 -c 1 $S python3 scripts/once_qmatmul.py "$@" > $OUT/ncu_$name.txt 2>&1; echo "== $name"; grep -E "^\s+(Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Warp Cycles Per Issued|Issued Ipc Active|No Eligible|Block Limit Registers|Block Limit Shared|Grid Size|Waves Per SM|L2 Hit Rate|Mem Busy|Max Bandwidth)" $OUT/ncu_$name.txt; grep -E "stalled_.*ratio" $OUT/ncu_$name.txt | awk '$NF+0 > 0.5' | sort -k3 -n -r | head -6; }
run gemv2_x4 _gemv2_kernel --cfg gemv2,1,64,128,4,4,0,4,1
run gemv2_x2 _gemv2_kernel --cfg gemv2,1,64,128,4,2,0,4,1
run mma_m16 _qmm_kernel --m 16 --cfg mma,16,64,64,4,2,1,4,3,1,1
