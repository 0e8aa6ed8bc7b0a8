import tornado.ioloop
import bonzo.smtp

class Handler(bonzo.smtp.RequestHandler):

    def data(self):
        print(self.request.message)

application = bonzo.smtp.Application(Handler)

if __name__ == '__main__':
    application.listen(2525)
    tornado.ioloop.IOLoop.current().start()
