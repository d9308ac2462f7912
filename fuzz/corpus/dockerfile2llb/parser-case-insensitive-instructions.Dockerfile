from busybox
run echo hi > /out
Copy a.txt /a.txt
env A=1
