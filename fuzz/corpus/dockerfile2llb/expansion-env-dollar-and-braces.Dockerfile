FROM busybox
ENV A=hello
ENV B=${A}-x C=$A D=pre$A
