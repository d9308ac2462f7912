FROM alpine
RUN echo ok > /ok
