FROM busybox
LABEL a=1 b="two words"
LABEL "c d"=e
