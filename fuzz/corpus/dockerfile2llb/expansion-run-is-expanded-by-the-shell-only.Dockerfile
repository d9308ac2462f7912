FROM busybox
ENV A=fromenv
RUN echo '$A' > /single
RUN echo $A > /shell
